"""EK-FAC curvature of Linear and Conv2d layers, fitted over a group of checkpoints.

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
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

from ..data import DataSource
from ..errors import TracInError
from ..gradients.per_example import GradientComputer, model_mode
from ..gradients.hooks import selected_layers

CURVATURES = ("gn", "mc", "empirical")


@dataclass
class LayerPlan:
    """One Linear/Conv2d layer: where its weight (and bias) sit in the flat gradient."""

    name: str
    module: nn.Module
    out_dim: int
    in_dim: int          # in_features, or C k k for Conv2d (without the bias column)
    has_bias: bool
    w_off: int
    b_off: int | None

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
        for mod_name, mod, has_w, has_b, plain in selected_layers(grads):
            if not (plain and has_w):
                bad.append(f"{mod_name or '<model>'} ({type(mod).__name__})")
                continue
            prefix = f"{mod_name}." if mod_name else ""
            in_dim = mod.in_features if isinstance(mod, nn.Linear) else \
                mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
            out_dim = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            self.plans.append(LayerPlan(mod_name, mod, out_dim, in_dim, has_b, offsets[prefix + "weight"],
                                        offsets[prefix + "bias"] if has_b else None))
        if bad:
            raise TracInError(
                f"SOURCE's EK-FAC curvature supports Linear and Conv2d layers (groups=1, numeric zero "
                f"padding) whose weight is trainable; unsupported layer(s) with selected parameters: {bad}. "
                "Select supported layers with TracIn(..., layers=[...]) or use method='tracin'.")
        self.num_params = grads.num_params

    # -- flat gradients <-> per-layer matrices ------------------------------------------------------
    def to_mats(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """flat (B, P) -> per layer (B, out, in'), bias as the last column."""
        mats = []
        for p in self.plans:
            W = flat[:, p.w_off:p.w_off + p.out_dim * p.in_dim].reshape(-1, p.out_dim, p.in_dim)
            if p.has_bias:
                W = torch.cat([W, flat[:, p.b_off:p.b_off + p.out_dim].unsqueeze(2)], 2)
            mats.append(W)
        return mats

    def from_mats(self, mats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of to_mats: per layer (B, out, in') -> flat (B, P)."""
        flat = torch.zeros(mats[0].shape[0], self.num_params, dtype=mats[0].dtype, device=mats[0].device)
        for p, M in zip(self.plans, mats):
            flat[:, p.w_off:p.w_off + p.out_dim * p.in_dim] = M[:, :, :p.in_dim].flatten(1)
            if p.has_bias:
                flat[:, p.b_off:p.b_off + p.out_dim] = M[:, :, -1]
        return flat

    # -- one batch: layer inputs and pseudo output gradients ----------------------------------------
    def capture(self, state: dict, x: torch.Tensor, y: torch.Tensor | None, curvature: str,
                generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (a (B, T, in'), g (B, K, T, out)) in float64: K pseudo-gradients per example."""
        gc = self.grads
        x = gc.cast(x)
        y = None if y is None else y.to(gc.device)
        gc.check_args(y, "loss")
        params = {k: (v.detach().requires_grad_(True) if k in gc.shapes else v) for k, v in state.items()}
        seen: dict[str, list] = {p.name: [] for p in self.plans}
        handles = [p.module.register_forward_hook(lambda m, i, o, n=p.name: seen[n].append((i[0].detach(), o)))
                   for p in self.plans]
        try:
            with model_mode(gc.model, gc.train_mode), torch.enable_grad():
                out = functional_call(gc.model, params, (x,))
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
            a, o = seen[p.name][0]
            gs = torch.stack([torch.zeros_like(o) if g[j] is None else g[j] for g in per_k], 1)
            result.append((self._inputs(p, a).double(), self._outgrads(p, gs).double()))
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

    @staticmethod
    def _inputs(p: LayerPlan, a: torch.Tensor) -> torch.Tensor:
        if isinstance(p.module, nn.Conv2d):
            m = p.module
            a = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)  # (B, T, Ckk)
        else:
            a = a.reshape(a.shape[0], -1, a.shape[-1])
        if p.has_bias:
            a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)], 2)
        return a

    @staticmethod
    def _outgrads(p: LayerPlan, g: torch.Tensor) -> torch.Tensor:
        B, K = g.shape[:2]
        if isinstance(p.module, nn.Conv2d):
            return g.reshape(B, K, p.out_dim, -1).transpose(2, 3)               # (B, K, T, O)
        return g.reshape(B, K, -1, g.shape[-1])


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
            n_total += x.shape[0]
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
