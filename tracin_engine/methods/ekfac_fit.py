"""Fitting EK-FAC: the Kronecker factors and their eigenvalue correction over a segment's checkpoints.

Example:
    >>> layers = KronLayers(grads)                                  # ekfac.py: the layers and their capture
    >>> check_factor_memory(layers)                                 # diagonal factors where full ones cannot fit
    >>> curv = fit_ekfac(layers, [state0, state1], source)          # list of LayerCurvature

Two passes over the data per checkpoint (ekfac.py's module docstring has the formulas): the factors
A = E[a a^T] and S = E[sum_k g g^T] (float64 sums of per-batch products in KronLayers.work), their
eigendecompositions, then Lambda_ij = E_n[sum_k (Q_S^T G_nk Q_A)_ij^2].
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .. import inputs as tree
from ..data import DataSource
from ..errors import TracInError
from ..memory import budget
from .curvature_blocks import LayerCurvature
from .ekfac import KronLayers, choose_curvature


def _one_hot_eigenvalues(ids: torch.Tensor, ga: torch.Tensor, V: int) -> torch.Tensor:
    """sum_b sum_k (sum_{t: x_bt = v} ga_bkt)^2 as (out, V), for ids (B, T) (-1: skipped) and ga (B, K, T, out):
    the eigenvalue correction of an Embedding (Q_A the identity), from the (example, token) pairs present."""
    B, K, T, O = ga.shape
    keep = ids >= 0
    keys = (torch.arange(B, device=ids.device).unsqueeze(1) * V + ids)[keep]
    pairs, which = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(len(pairs), K, O, dtype=ga.dtype, device=ga.device)
    sums.index_add_(0, which, ga.permute(0, 2, 1, 3)[keep])                        # (pairs, K, out)
    out = torch.zeros(O, V, dtype=ga.dtype, device=ga.device)
    return out.index_add_(1, pairs % V, sums.pow(2).sum(1).T)


def check_factor_memory(layers: KronLayers) -> None:
    """Make the factors fit in half the device's free memory: where A (in' x in') and S (out x out), their
    eigenvectors and Lambda (out x in') of all layers (float64) would not, the largest square factors are kept
    as their diagonals (the eigenbasis on that side is then the identity: a language model's output layer over
    a vocabulary of 32,000 gets a diagonal S of 32,000 numbers instead of 8 GB), with one warning naming them;
    refuses, naming the largest layers, when even that does not fit."""
    room = budget(layers.grads.device)
    need = sum(p.factor_bytes for p in layers.plans)
    first, shrunk = need, []
    while need > room:
        square = [(p.out_dim ** 2, p, "out") for p in layers.plans if not p.vector and not p.diagonal] + \
                 [(p.cols ** 2, p, "in") for p in layers.plans if not p.vector and not p.a_diagonal]
        if not square:
            break
        _, p, side = max(square, key=lambda t: t[0])
        setattr(p, f"diag_{side}", True)
        shrunk.append(f"{p.key} ({p.out_dim if side == 'out' else p.cols} {side}puts)")
        need = sum(q.factor_bytes for q in layers.plans)
    if need > room:
        sizes = sorted(((p.factor_bytes, p) for p in layers.plans), key=lambda t: -t[0])
        big = ", ".join(f"{p.key} ({p.out_dim} x {p.cols}: {_bytes(n)})" for n, p in sizes[:3])
        raise TracInError(f"SOURCE's EK-FAC factors need {_bytes(need)} even with diagonal factors (float64: "
                          f"each layer's (in x in) and (out x out) factors, eigenvectors and eigenvalues), "
                          f"{_bytes(room)} can be used; the largest are {big}. Leave the largest out with "
                          "TracIn(..., layers=[...]) (a language model's output layer over its vocabulary, above all).")
    if shrunk:
        warnings.warn(f"SOURCE's EK-FAC factors would need {_bytes(first)}, {_bytes(room)} can be used: diagonal "
                      f"factors for {', '.join(shrunk)} (their eigenbasis on that side is the identity), "
                      f"{_bytes(need)}. Leave those layers out (layers=[...]) for the full "
                      "factors of the rest, or run on a machine with more memory.", stacklevel=3)


def _bytes(n: float) -> str:
    """'2.5 GiB', '340.0 MiB', '6.8 KiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def fit_ekfac(layers: KronLayers, states: Sequence[dict], source: DataSource, curvature: str = "auto",
              batch_size: int = 256, seed: int = 0) -> list[LayerCurvature]:
    """EK-FAC per layer, factors and eigenvalues averaged over `states` (one segment's checkpoints).

    Two passes over `source` per state: Kronecker factors A, S, then the eigenvalue correction.
    """
    curvature = choose_curvature(curvature, layers, states[0], source)
    if layers.grads.loss_fn is None:
        raise TracInError("SOURCE needs the training loss; pass loss_fn=... to TracIn.")
    check_factor_memory(layers)
    dev = layers.grads.device
    A = S = None                                     # sized after the first capture (it may move layers: _leave_out)
    n_total = 0
    for state in states:
        gen = torch.Generator().manual_seed(seed)
        for _, x, y in source.batches(batch_size):
            captured = layers.capture(state, x, y, curvature, gen)
            if A is None:
                check_factor_memory(layers)              # (again: the capture may have re-planned)
                A = [torch.zeros((p.cols,) * (1 if p.a_diagonal else 2), dtype=torch.float64, device=dev)
                     for p in layers.plans]
                S = [torch.zeros((p.out_dim,) * (1 if p.diagonal else 2), dtype=torch.float64, device=dev)
                     for p in layers.plans]
            for j, (a, g) in enumerate(captured):
                if layers.plans[j].one_hot:                               # one-hot ids: token counts
                    A[j] += torch.bincount(a[a >= 0], minlength=A[j].shape[0]).double() / a.shape[1]
                elif A[j].dim() == 1:                                     # a diagonal A
                    A[j] += a.pow(2).sum((0, 1)).double() / a.shape[1]
                else:
                    A[j] += torch.einsum("bti,btj->ij", a, a).double() / a.shape[1]
                S[j] += (g.pow(2).sum((0, 1, 2)) if S[j].dim() == 1 else torch.einsum("bkti,bktj->ij", g, g)).double()
            n_total += tree.length(x)
    eigs = []
    for j in range(len(layers.plans)):
        eA, QA = (A[j] / n_total, None) if A[j].dim() == 1 else torch.linalg.eigh(A[j] / n_total)
        eS, QS = (S[j] / n_total, None) if S[j].dim() == 1 else torch.linalg.eigh(S[j] / n_total)
        eigs.append((eA.clamp_min(0), QA, eS.clamp_min(0), QS))
    lam = [torch.zeros(p.out_dim, p.cols, dtype=torch.float64, device=dev) for p in layers.plans]
    work = [tuple(None if Q is None else Q.to(layers.work) for Q in (QA, QS)) for _, QA, _, QS in eigs]
    for state in states:
        gen = torch.Generator().manual_seed(seed)
        for _, x, y in source.batches(batch_size):
            for j, (a, g) in enumerate(layers.capture(state, x, y, curvature, gen)):
                QA, QS = work[j]
                ga = g if QS is None else g @ QS                          # Q_S^T g
                if layers.plans[j].one_hot:                               # sum over positions of one token
                    lam[j] += _one_hot_eigenvalues(a, ga, lam[j].shape[1]).double()
                    continue
                aa = a if QA is None else a @ QA                          # Q_A^T a
                if a.shape[1] == 1:                                       # rank one: square the factors
                    lam[j] += torch.einsum("bko,bi->oi", ga[:, :, 0].pow(2), aa[:, 0].pow(2)).double()
                else:                                                     # sum over positions first
                    lam[j] += torch.einsum("bkto,bti->bkoi", ga, aa).square_().sum((0, 1)).double()
    return [LayerCurvature(QA, QS, lam[j] / n_total, eA, eS) for j, (eA, QA, eS, QS) in enumerate(eigs)]
