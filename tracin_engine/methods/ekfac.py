"""EK-FAC curvature of the layers whose handlers give Kronecker factors, fitted over a group of checkpoints.

Example:
    >>> layers = KronLayers(grads)                                  # grads: GradientComputer
    >>> fit = fit_ekfac(layers, [state0, state1], (X, y))           # list of LayerCurvature
    >>> mats = layers.to_mats(G)                                    # flat (B, P) -> [(B, out, in')]

Per layer, a per-example gradient is a matrix G (out, in') with in' = in (+1 for the bias, the
last column; Conv2d: in = C k k over unfolded patches). The Gauss-Newton matrix of the mean
training loss, H = 1/N sum_n sum_k vec(G_nk) vec(G_nk)^T (G_nk = J_n^T u_nk, u_nk the columns of
a factor of the output Hessian, H_out = U U^T), is approximated per layer by
    K-FAC:  A (x) S  with  A = E[a a^T] (mean over examples, and positions for Conv2d),
                           S = E[sum_k sum_t g g^T]   (g = output gradients of the layer)
    EK-FAC: (Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T,  Lambda_ij = E_n[sum_k (Q_S^T G_nk Q_A)_ij^2]
with Q_A, Q_S the eigenvectors of A, S averaged over the checkpoints (George et al. 2018). The
eigenvalue correction is the best diagonal in that basis (Frobenius), so EK-FAC is never farther
from the block than K-FAC. curvature="gn" uses the exact output-Hessian factor (one backward pass
per output dimension), "mc" one Gaussian sample u = U eps (unbiased), "empirical" the true-label
loss gradient (the empirical Fisher). For softmax cross-entropy "gn" is the true Fisher: the
expectation over labels drawn from the model's predictive distribution, computed exactly rather
than sampled (H_out = diag(p) - p p^T). Default in SOURCE: "gn"; for many output dimensions use "mc".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import grad, hessian, vmap

from .. import inputs as tree
from ..data import DataSource
from ..errors import TracInError
from ..gradients.per_example import GradientComputer, model_mode
from ..gradients.handlers import KronHandler
from ..gradients.hooks import batch_layouts, read_grad, record_call
from ..gradients.layers import plan_blocks

CURVATURES = ("gn", "mc", "empirical")


@dataclass
class LayerPlan:
    """One layer with Kronecker factors (Linear, Conv1d/2d): where its weight (and bias) sit in the flat gradient."""

    name: str
    module: nn.Module
    out_dim: int
    in_dim: int          # in_features, or C k k for Conv2d (without the bias column)
    has_bias: bool
    w_off: int
    b_off: int | None
    handler: KronHandler

    @property
    def cols(self) -> int:
        return self.in_dim + self.has_bias


@dataclass
class LayerCurvature:
    """EK-FAC of one layer: H ~ (Q_S (x) Q_A) diag(lam.flatten()) (Q_S (x) Q_A)^T, float64.

    QA (in', in'), QS (out, out), lam (out, in'); eig_A (in',) and eig_S (out,) give K-FAC
    (eig_S[i] * eig_A[j] in place of lam[i, j]).
    """

    QA: torch.Tensor
    QS: torch.Tensor
    lam: torch.Tensor
    eig_A: torch.Tensor
    eig_S: torch.Tensor

    def dense(self, kfac: bool = False) -> torch.Tensor:
        """The (out in', out in') matrix in row-major vec(G) order (for tests and small layers)."""
        Q = torch.kron(self.QS, self.QA)
        d = torch.outer(self.eig_S, self.eig_A) if kfac else self.lam
        return Q @ torch.diag(d.flatten()) @ Q.T


class KronLayers:
    """The selected parameters of `grads` as Linear/Conv2d layers; raises naming unsupported ones."""

    def __init__(self, grads: GradientComputer):
        self.grads = grads
        offsets, pos = {}, 0
        for n in grads.param_names:
            offsets[n] = pos
            pos += int(np.prod(grads.shapes[n]))
        self.plans: list[LayerPlan] = []
        bad = []
        for b in plan_blocks(grads.model, grads.param_names, grads.train_mode):
            h = b.uses[0].handler if b.uses else None
            if b.kind != "kron" or len(b.uses) != 1 or not h.kronecker:
                bad += [f"{u.name or '<model>'} ({type(u.handler.module).__name__})" for u in b.uses] or b.params
                continue
            self.plans.append(LayerPlan(b.uses[0].name, h.module, b.R, b.C, b.has_bias, offsets[b.params[0]],
                                        offsets[b.params[1]] if b.has_bias else None, h))
        if bad:
            raise TracInError(
                f"SOURCE's EK-FAC curvature supports layers with Kronecker factors (Linear, Conv1d, Conv2d with "
                f"groups=1 and numeric zero padding, MultiheadAttention's input projection, each used once) "
                f"whose weight is trainable; unsupported "
                f"layer(s) or parameters selected: {bad}. Select supported layers with TracIn(..., layers=[...]) "
                "or use method='tracin'.")
        self.num_params = grads.num_params

    # -- flat gradients <-> per-layer matrices ------------------------------------------------------
    def to_mats(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """flat (B, P) -> per layer (B, out, in'), bias as the last column."""
        mats = []
        for p in self.plans:
            W = p.handler.from_params(flat[:, p.w_off:p.w_off + p.out_dim * p.in_dim])
            if p.has_bias:
                W = torch.cat([W, flat[:, p.b_off:p.b_off + p.out_dim].unsqueeze(2)], 2)
            mats.append(W)
        return mats

    def from_mats(self, mats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of to_mats: per layer (B, out, in') -> flat (B, P)."""
        flat = torch.zeros(mats[0].shape[0], self.num_params, dtype=mats[0].dtype, device=mats[0].device)
        for p, M in zip(self.plans, mats):
            flat[:, p.w_off:p.w_off + p.out_dim * p.in_dim] = p.handler.to_params(M[:, :, :p.in_dim])
            if p.has_bias:
                flat[:, p.b_off:p.b_off + p.out_dim] = M[:, :, -1]
        return flat

    # -- one batch: layer inputs and pseudo output gradients ----------------------------------------
    def capture(self, state: dict, x: Any, y: torch.Tensor | None, curvature: str,
                generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (a (B, T, in'), g (B, K, T, out)) in float64: K pseudo-gradients per example."""
        gc = self.grads
        x, y = gc.batch(x, y)
        gc.check_args(y, "loss")
        params = {k: (v.detach().requires_grad_(True) if k in gc.shapes else v) for k, v in state.items()}
        seen: dict[str, list] = {p.name: [] for p in self.plans}
        B = tree.length(x)

        def record(p, i, o):                           # the hook path's (ctx, probe, layout) per call
            seen[p.name].append(record_call(p.handler, i, o, batch_layouts(p.handler, i, o, B)[0], B))

        handles = [p.handler.attach(lambda m, i, o, p=p: record(p, i, o)) for p in self.plans]
        try:
            with model_mode(gc.model, gc.train_mode), torch.enable_grad():
                out = gc.forward(params, x, y)
        finally:
            for h in handles:
                h.remove()
        if any(len(v) != 1 for v in seen.values()):
            raise TracInError("a layer ran more than once per forward pass (shared weights); "
                              "SOURCE's EK-FAC needs each Linear/Conv2d layer to run once.")
        gc.check_outputs(out, y, "loss")
        U = self._output_factors(out.detach(), y, curvature, generator)          # (B, K, O)
        outs = [seen[p.name][0][1] for p in self.plans]
        per_k = []
        for k in range(U.shape[1]):
            g = torch.autograd.grad(out, outs, grad_outputs=U[:, k].reshape(out.shape).to(out.dtype),
                                    retain_graph=k + 1 < U.shape[1], allow_unused=True)
            per_k.append(g)
        result = []
        for j, p in enumerate(self.plans):
            ctx, o, layout = seen[p.name][0]
            gs = torch.stack([p.handler.rows(ctx, read_grad(o, g[j], layout, B)) for g in per_k], 1)
            a = p.handler.cols(ctx, o)
            if p.has_bias:
                a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)], 2)
            result.append((a.double(), gs.double()))
        return result

    def _output_factors(self, out: torch.Tensor, y: torch.Tensor | None, curvature: str,
                        generator: torch.Generator | None) -> torch.Tensor:
        """U (B, K, O) with sum_k u_k u_k^T = H_out ("gn"), a sample of it ("mc"), or grad l ("empirical")."""
        loss_fn = self.grads.loss_fn
        shape = out.shape[1:]

        def one(o, t):
            return loss_fn(o.reshape(shape).unsqueeze(0), t.unsqueeze(0)).reshape(())

        flat = out.reshape(out.shape[0], -1)
        if y is not None and y.is_floating_point():
            y = y.to(torch.float64 if curvature != "empirical" else flat.dtype)
        if curvature == "empirical":
            return vmap(grad(lambda o, t: one(o, t)))(flat, y).unsqueeze(1)
        H = vmap(hessian(lambda o, t: one(o, t)))(flat.double(), y)             # (B, O, O)
        ev, V = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)
        L = V * ev.clamp_min(0).sqrt().unsqueeze(1)                              # H = L L^T
        if curvature == "gn":
            return L.transpose(1, 2)
        eps = torch.randn(flat.shape[0], flat.shape[1], 1, dtype=L.dtype, generator=generator)
        return (L @ eps.to(L.device)).transpose(1, 2)


def fit_ekfac(layers: KronLayers, states: Sequence[dict], source: DataSource, curvature: str = "gn",
              batch_size: int = 256, seed: int = 0) -> list[LayerCurvature]:
    """EK-FAC per layer, factors and eigenvalues averaged over `states` (one segment's checkpoints).

    Two passes over `source` per state: Kronecker factors A, S, then the eigenvalue correction.
    """
    if curvature not in CURVATURES:
        raise TracInError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
    if layers.grads.loss_fn is None:
        raise TracInError("SOURCE needs the training loss; pass loss_fn=... to TracIn.")
    dev = layers.grads.device
    A = [torch.zeros(p.cols, p.cols, dtype=torch.float64, device=dev) for p in layers.plans]
    S = [torch.zeros(p.out_dim, p.out_dim, dtype=torch.float64, device=dev) for p in layers.plans]
    n_total = 0
    for state in states:
        gen = torch.Generator().manual_seed(seed)
        for _, x, y in source.batches(batch_size):
            for j, (a, g) in enumerate(layers.capture(state, x, y, curvature, gen)):
                A[j] += torch.einsum("bti,btj->ij", a, a) / a.shape[1]
                S[j] += torch.einsum("bkti,bktj->ij", g, g)
            n_total += tree.length(x)
    eigs = []
    for j in range(len(layers.plans)):
        eA, QA = torch.linalg.eigh(A[j] / n_total)
        eS, QS = torch.linalg.eigh(S[j] / n_total)
        eigs.append((eA.clamp_min(0), QA, eS.clamp_min(0), QS))
    lam = [torch.zeros(p.out_dim, p.cols, dtype=torch.float64, device=dev) for p in layers.plans]
    for state in states:
        gen = torch.Generator().manual_seed(seed)
        for _, x, y in source.batches(batch_size):
            for j, (a, g) in enumerate(layers.capture(state, x, y, curvature, gen)):
                _, QA, _, QS = eigs[j]
                ga, aa = g @ QS, a @ QA                                   # project first: Q_S^T g, Q_A^T a
                if a.shape[1] == 1:                                       # rank one: square the factors
                    lam[j] += torch.einsum("bko,bi->oi", ga[:, :, 0].pow(2), aa[:, 0].pow(2))
                else:                                                     # sum over positions first
                    lam[j] += torch.einsum("bkto,bti->bkoi", ga, aa).pow(2).sum((0, 1))
    return [LayerCurvature(QA, QS, lam[j] / n_total, eA, eS) for j, (eA, QA, eS, QS) in enumerate(eigs)]

