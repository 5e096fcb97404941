"""Per-layer factored random projection of Linear and Conv2d gradients, never materializing them.

Example:
    >>> tracin = TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=4096, projection="factored")
    >>> fp = tracin.featurizer.projection          # FactoredProjection
    >>> rows = fp(state, x, y)                     # (B, fp.layout.dim), one batched forward+backward
    >>> fp.expand(rows) ~= G @ fp.matrix()         # G (B, P) exact flat gradients; slow check for tests

A layer with input a and output gradient g (both per example, from one batched forward and one
backward of sum_b l_b) has weight gradient  dW = sum_l g_l a_l^T  (l: output positions of a Conv2d,
one position for a Linear; a bias is the weight of a constant input 1 appended to a). With seeded
factors P_a (A, k_a) and P_g (O, k_g), entries N(0, 1/k) (or +-1/sqrt(k)), the layer's feature is

    Z = P_g^T dW P_a = sum_l (P_g^T g_l)(P_a^T a_l)^T          (k_g, k_a)

i.e. vec(dW) projected by the Kronecker matrix R = P_g (x) P_a, with E[R R^T] = I so inner products
are kept in expectation. For a Conv2d, P_a^T a_l over all positions l is a convolution of the input
with P_a as k_a filters (C, kh, kw) and the bias row as conv bias: no unfold. A Linear gradient is
rank one, so its row stores the two factors (P_a^T a, P_g^T g) (an "outer" segment, k_a + k_g
numbers; see layout.py) and inner products of Z are still exact products of factor inner products.
A factor is the identity (exact) when its full width fits, so small layers are stored exactly.

proj_dim is the row length budget. It is shared over layers by water-filling: layers whose exact
row fits an equal share are exact, the rest split what is left; inside a layer (k_g, k_a) minimize
the JL error proxy 1/k_a + 1/k_g (0 for an exact factor) under the layer's budget.
Other layer types (BatchNorm, LayerNorm, Embedding, ...) are not covered: selecting them raises
TracInError (choose layers=[...] of Linear/Conv2d, or projection="gaussian").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TracInError
from .per_example import GradientComputer
from .hooks import HookFeaturizer, Unsupported
from ..store.layout import Layout, Segment


def _factor(seed: int, layer: int, side: int, rows: int, k: int, kind: str) -> torch.Tensor:
    """(rows, k) seeded factor with E[P P^T] = I; the identity when k == rows."""
    if k == rows:
        return torch.eye(rows)
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + 7919 * layer + side)
    if kind == "gaussian":
        return torch.randn(rows, k, generator=gen).div_(k ** 0.5)
    return torch.randint(0, 2, (rows, k), generator=gen).float().mul_(2).sub_(1).div_(k ** 0.5)


def _split(budget: int, A: int, O: int, outer: bool) -> tuple[int, int]:
    """(k_a, k_g) with k_a + k_g (outer) or k_a * k_g (dense) <= budget, minimizing 1/k_a + 1/k_g."""
    best, best_cost = None, float("inf")
    for kg in range(1, O + 1):
        ka = min(A, budget - kg if outer else budget // kg)
        if ka < 1:
            break
        cost = (0 if ka == A else 1 / ka) + (0 if kg == O else 1 / kg)
        if cost < best_cost:
            best, best_cost = (ka, kg), cost
    return best


class FactoredProjection(HookFeaturizer):
    """Projected rows (B, layout.dim <= proj_dim) of Linear/Conv2d layers from hooks on one batched pass."""

    def __init__(self, grads: GradientComputer, proj_dim: int, seed: int = 0, kind: str = "gaussian"):
        if kind not in ("gaussian", "rademacher"):
            raise TracInError(f"unknown factor kind {kind!r}; use 'gaussian' or 'rademacher'.")
        try:
            super().__init__(grads)
        except Unsupported as exc:
            raise TracInError(f"projection='factored' covers Linear and Conv2d layers only: {exc}. Select "
                              "those layers with layers=[...] or use projection='gaussian'.") from None
        self.proj_dim, self.seed, self.kind = proj_dim, seed, kind
        # per layer: A (input width incl. bias row), O, outer?
        shapes = []
        for name, mod, has_w, has_b in self.plan:
            A = (mod.in_features if isinstance(mod, nn.Linear)
                 else mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]) * has_w + has_b
            shapes.append((A, mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels,
                           isinstance(mod, nn.Linear)))
        need = 2 * len(shapes)
        if proj_dim < need:
            raise TracInError(f"proj_dim={proj_dim} is too small for {len(shapes)} layers with "
                              f"projection='factored'; use at least {need}.")
        self.k = self._allocate(shapes, proj_dim)
        segments, start = [], 0
        for (A, O, outer), (ka, kg) in zip(shapes, self.k):
            seg = Segment("outer", start, ka, kg) if outer else Segment("dense", start, ka * kg)
            segments.append(seg)
            start += seg.size
        self.shapes = shapes
        self.layout = Layout(segments)
        self._cache: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _allocate(shapes: list[tuple[int, int, bool]], budget: int) -> list[tuple[int, int]]:
        exact = [A + O if outer else A * O for A, O, outer in shapes]
        k: list[tuple[int, int] | None] = [None] * len(shapes)
        order = sorted(range(len(shapes)), key=lambda i: exact[i])
        for pos, i in enumerate(order):
            A, O, outer = shapes[i]
            share = budget // (len(order) - pos)
            k[i] = (A, O) if exact[i] <= share else _split(share, A, O, outer)
            budget -= k[i][0] + k[i][1] if outer else k[i][0] * k[i][1]
        return k

    def factors(self, i: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_a (A, k_a), P_g (O, k_g)) of layer i: generated on the CPU from the seed, so every device,
        run and process (train and test) gets the same numbers."""
        key = (i, device, dtype)
        if key not in self._cache:
            (A, O, _), (ka, kg) = self.shapes[i], self.k[i]
            self._cache[key] = (_factor(self.seed, i, 0, A, ka, self.kind).to(device, dtype),
                                _factor(self.seed, i, 1, O, kg, self.kind).to(device, dtype))
        return self._cache[key]

    def _layer_rows(self, mod: nn.Module, a: torch.Tensor, g: torch.Tensor, has_w: bool,
                    has_b: bool) -> torch.Tensor:
        i = next(j for j, p in enumerate(self.plan) if p[1] is mod)
        Pa, Pg = self.factors(i, a.device, a.dtype)
        B = a.shape[0]
        if isinstance(mod, nn.Linear):
            if a.dim() != 2:
                raise TracInError(f"projection='factored' needs 2-D inputs to Linear layers; layer "
                                  f"{self.plan[i][0]!r} got shape {tuple(a.shape)}. Use projection='gaussian'.")
            ones = torch.ones(B, 1, dtype=a.dtype, device=a.device)
            a1 = torch.cat([a, ones], 1) if has_w and has_b else (a if has_w else ones)
            return torch.cat([a1 @ Pa, g @ Pg], 1)
        if has_w:  # P_a^T a_l at every output position: the projection as convolution filters
            ka, Ckk = Pa.shape[1], Pa.shape[0] - has_b
            filt = Pa[:Ckk].T.reshape(ka, mod.in_channels, *mod.kernel_size)
            Az = F.conv2d(a, filt, Pa[Ckk] if has_b else None, mod.stride, mod.padding, mod.dilation)
            Az = Az.flatten(2)                                                     # (B, k_a, L)
        else:
            Az = torch.ones(B, 1, g.shape[2] * g.shape[3], dtype=a.dtype, device=a.device)
        Gz = torch.einsum("bol,ok->bkl", g.flatten(2), Pg)                         # (B, k_g, L)
        return torch.bmm(Gz, Az.transpose(1, 2)).flatten(1)                        # (B, k_g * k_a)

    # -- the equivalent dense projection (slow; for tests and small models) -------------------------
    def expand(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (B, layout.dim) -> (B, D) dense projected vectors, D = sum_l k_g k_a (outer segments
        expanded to vec(P_g^T g (P_a^T a)^T)); equals G @ matrix() for the flat gradients G."""
        out = []
        for seg in self.layout.segments:
            r = rows[:, seg.start:seg.start + seg.size]
            if seg.kind == "outer":
                r = (r[:, seg.a_dim:].unsqueeze(2) * r[:, :seg.a_dim].unsqueeze(1)).flatten(1)
            out.append(r)
        return torch.cat(out, 1)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The equivalent projection R (P, D) of flat gradients (GradientComputer order: weight, bias)."""
        cpu = torch.device("cpu")
        D = sum(ka * kg for ka, kg in self.k)
        R = torch.zeros(self.grads.num_params, D, dtype=dtype)
        row = col = 0
        for i, (name, mod, has_w, has_b) in enumerate(self.plan):
            Pa, Pg = self.factors(i, cpu, dtype)
            (A, O, _), (ka, kg) = self.shapes[i], self.k[i]
            K = torch.einsum("oi,nj->onij", Pg, Pa).reshape(O, A, kg * ka)       # row (o, n), col (i, j)
            parts = ([K[:, :A - has_b].reshape(-1, kg * ka)] if has_w else []) + ([K[:, A - 1]] if has_b else [])
            for part in parts:
                R[row:row + part.shape[0], col:col + kg * ka] = part
                row += part.shape[0]
            col += kg * ka
        return R
