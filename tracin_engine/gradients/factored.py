"""Per-layer factored random projection of per-example gradients, never materializing them.

Example:
    >>> tracin = TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=4096)   # projection="auto"
    >>> fp = tracin.featurizer.projection          # FactoredProjection
    >>> rows = fp(state, x, y)                     # (B, fp.layout.dim), one batched forward+backward
    >>> fp.expand(rows) ~= G @ fp.matrix()         # G (B, P) exact flat gradients; slow check for tests

A weight block (layers.py) has per-example gradient dW = sum_t r_t c_t^T (handlers/base.py: for a
Linear r = g_t the output gradient and c = a_t the input at position t, a Conv2d's positions are its
output pixels, an Embedding's r_t is the one-hot of token t; a bias is the weight of a constant
column 1 appended to c). With seeded factors P_c (C', k_c) and P_r (R, k_r), entries N(0, 1/k)
(or +-1/sqrt(k)), the block's feature is

    Z = P_r^T dW P_c = sum_t (P_r^T r_t)(P_c^T c_t)^T          (k_r, k_c)

i.e. vec(dW) projected by the Kronecker matrix P_r (x) P_c, with E[R R^T] = I so inner products are
kept in expectation; never a (R, C) matrix per token. For a Conv2d, P_c^T c_t over all positions is
a convolution of the input with P_c as k_c filters; for an Embedding P_r^T r_t is a row lookup. A
block with one position per example (Linear on 2-D input) is rank one, so its row stores the two
factors (P_c^T a, P_r^T g) (an "outer" segment, k_c + k_r numbers; see layout.py). Small vector
blocks (norm scales and shifts; parameters no handler covers) are projected by one seeded (n, k)
factor. A factor is the identity (exact) when its full width fits, so small layers are stored exactly.
A dense block whose share s is small is first projected Kronecker-wise to a wider (k_r, k_c)
(k_r k_c up to 16 s or 4096) and then by a seeded dense Gaussian Q (k_r k_c, s): the Kronecker
step alone would have relative variance ~ 1/k_r + 1/k_c ~ 2/sqrt(s) (see _allocate).

proj_dim is the row length budget. It is shared over blocks by water-filling: blocks whose exact
row fits an equal share are exact, the rest split what is left; inside a block (k_r, k_c) minimize
the JL error proxy 1/k_c + 1/k_r (0 for an exact factor) under the block's budget.
"""

from __future__ import annotations

import torch

from ..errors import TracInError
from .hooks import Contribution, HookFeaturizer, Unsupported
from .layers import Block
from .per_example import GradientComputer
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
    """Projected rows (B, layout.dim <= proj_dim) of every handled block from hooks on one batched pass."""

    def __init__(self, grads: GradientComputer, proj_dim: int, seed: int = 0, kind: str = "gaussian"):
        if kind not in ("gaussian", "rademacher"):
            raise TracInError(f"unknown factor kind {kind!r}; use 'gaussian' or 'rademacher'.")
        self.proj_dim, self.seed, self.kind = proj_dim, seed, kind
        self._cache: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            super().__init__(grads)
        except Unsupported as exc:
            raise TracInError(f"projection='factored' cannot cover the selected parameters: {exc}. Register a "
                              "handler for that layer type (docs/handlers.md), select other layers with "
                              "layers=[...], or use projection='gaussian'.") from None

    # -- budget -------------------------------------------------------------------------------------
    def relayout(self) -> None:
        # per block: (A, O, outer): A the column width incl. the bias column (vector blocks: n, O = 1)
        self.shapes = [(b.a_dim, b.R, b.outer) if b.kind == "kron" else (b.n, 1, False) for b in self.blocks]
        need = 2 * len(self.shapes)
        if self.proj_dim < need:
            raise TracInError(f"proj_dim={self.proj_dim} is too small for {len(self.shapes)} layers with "
                              f"projection='factored'; use at least {need}.")
        self.k, self.k2 = self._allocate(self.shapes, self.proj_dim)
        self._cache.clear()
        segments, start = [], 0
        for (A, O, outer), (ka, kg), k2 in zip(self.shapes, self.k, self.k2):
            seg = Segment("outer", start, ka, kg) if outer else Segment("dense", start, k2 or ka * kg)
            segments.append(seg)
            start += seg.size
        self.segments = segments
        self.layout = Layout(segments)

    @staticmethod
    def _allocate(shapes: list[tuple[int, int, bool]], budget: int
                  ) -> tuple[list[tuple[int, int]], list[int | None]]:
        """Per block (k_a, k_g) and k2: the row gets k2 numbers (a second, dense Gaussian stage Q applied to
        the (k_g, k_a) Kronecker projection) or, k2 None, k_g k_a (dense) / k_a + k_g (outer) numbers.

        A dense block's Kronecker projection alone has relative variance ~ 1/k_a + 1/k_g, with
        k_a k_g = its share s (~2/sqrt(s)); projecting a wider one, k_a k_g = I = min(A O, 16 s, 4096),
        down to s with Q (I, s) gives ~ 1/k_a + 1/k_g + 1/s, much smaller; Q holds I s <= 4096 s numbers.
        """
        exact = [A + O if outer else A * O for A, O, outer in shapes]
        k: list[tuple[int, int] | None] = [None] * len(shapes)
        k2: list[int | None] = [None] * len(shapes)
        order = sorted(range(len(shapes)), key=lambda i: exact[i])
        for pos, i in enumerate(order):
            A, O, outer = shapes[i]
            share = budget // (len(order) - pos)
            if exact[i] <= share:
                k[i] = (A, O)
            elif outer or O == 1:
                k[i] = _split(share, A, O, outer)
            else:
                wide = min(A * O, 16 * share, 4096)
                if wide > share:
                    k[i], k2[i] = _split(wide, A, O, False), share
                else:
                    k[i] = _split(share, A, O, False)
            ka, kg = k[i]
            budget -= k2[i] or (ka + kg if outer else ka * kg)
        return k, k2

    def factors(self, i: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_c (A, k_c), P_r (R, k_r)) of block i: generated on the CPU from the seed, so every device,
        run and process (train and test) gets the same numbers."""
        key = (i, device, dtype)
        if key not in self._cache:
            (A, O, _), (ka, kg) = self.shapes[i], self.k[i]
            self._cache[key] = (_factor(self.seed, i, 0, A, ka, self.kind).to(device, dtype),
                                _factor(self.seed, i, 1, O, kg, self.kind).to(device, dtype))
        return self._cache[key]

    def second(self, i: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """Q (k_g k_a, k2) of block i, or None when its Kronecker projection is the row."""
        if self.k2[i] is None:
            return None
        key = (-1 - i, device, dtype)
        if key not in self._cache:
            ka, kg = self.k[i]
            self._cache[key] = _factor(self.seed, i, 2, ka * kg, self.k2[i], self.kind).to(device, dtype)
        return self._cache[key]

    # -- rows ---------------------------------------------------------------------------------------
    def block_rows(self, i: int, b: Block, contrib: list[Contribution], out: torch.Tensor) -> None:
        h0, ctx0, g0 = contrib[0]
        Pa, Pg = self.factors(i, g0.device, g0.dtype)
        if b.kind == "vector":
            v = h0.vector(ctx0, g0)
            for h, ctx, g in contrib[1:]:
                v = v + h.vector(ctx, g)
            out.copy_(v if self.k[i][0] == b.n else v @ Pa)
            return
        Pw, pb = (Pa[:b.C], Pa[b.C]) if b.has_bias else (Pa, None)
        if b.outer:
            out[:, :Pa.shape[1]] = h0.proj_cols(ctx0, g0, Pw, pb)[:, 0]
            out[:, Pa.shape[1]:] = h0.proj_rows(ctx0, g0, Pg)[:, 0]
            return
        Z = None
        for h, ctx, g in contrib:
            z = torch.bmm(h.proj_rows(ctx, g, Pg).transpose(1, 2), h.proj_cols(ctx, g, Pw, pb))  # (B, k_r, k_c)
            Z = z if Z is None else Z.add_(z)
        Q = self.second(i, g0.device, g0.dtype)
        out.copy_(Z.flatten(1) if Q is None else Z.flatten(1) @ Q)

    def generic_rows(self, i: int, b: Block, flat: torch.Tensor, out: torch.Tensor) -> None:
        Pa, _ = self.factors(i, flat.device, flat.dtype)
        out.copy_(flat if self.k[i][0] == b.n else flat @ Pa)

    # -- checks and the equivalent dense projection (slow; for tests and small models) ---------------
    def block_sums(self, rows: torch.Tensor) -> list[torch.Tensor]:
        E = self.expand(rows).sum(0)
        return list(E.split([k2 or ka * kg for (ka, kg), k2 in zip(self.k, self.k2)]))

    def block_reference(self, b: Block, grads: list[torch.Tensor]) -> torch.Tensor:
        i = self.blocks.index(b)
        Pa, Pg = self.factors(i, grads[0].device, grads[0].dtype)
        if b.kind != "kron":
            return torch.cat(grads) @ Pa
        W = b.uses[0].handler.from_params(grads[0].unsqueeze(0))[0]
        if b.has_bias:
            W = torch.cat([W, grads[1].unsqueeze(1)], 1)
        Z = (Pg.T @ W @ Pa).flatten()
        Q = self.second(i, Z.device, Z.dtype)
        return Z if Q is None else Z @ Q

    def expand(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (B, layout.dim) -> (B, D) dense projected vectors, D = sum_l k_r k_c (outer segments
        expanded to vec(P_r^T g (P_c^T a)^T)); equals G @ matrix() for the flat gradients G."""
        out = []
        for seg in self.layout.segments:
            r = rows[:, seg.start:seg.start + seg.size]
            if seg.kind == "outer":
                r = (r[:, seg.a_dim:].unsqueeze(2) * r[:, :seg.a_dim].unsqueeze(1)).flatten(1)
            out.append(r)
        return torch.cat(out, 1)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The equivalent projection R (P, D) of flat gradients (GradientComputer order)."""
        cpu = torch.device("cpu")
        D = sum(k2 or ka * kg for (ka, kg), k2 in zip(self.k, self.k2))
        R = torch.zeros(self.grads.num_params, D, dtype=dtype)
        col = 0
        for i, b in enumerate(self.blocks):
            Pa, Pg = self.factors(i, cpu, dtype)
            (A, O, _), (ka, kg) = self.shapes[i], self.k[i]
            if b.kind == "kron":
                K = torch.einsum("oi,nj->onij", Pg, Pa).reshape(O, A, kg * ka)    # row (o, n), col (i, j)
                parts = [b.uses[0].handler.to_params(K[:, :b.C].permute(2, 0, 1)).T]
                if b.has_bias:
                    parts.append(K[:, b.C])
            else:
                parts, pos = [], 0
                for n in b.params:
                    k = self._numel(n)
                    parts.append(Pa[pos:pos + k])
                    pos += k
            Q = self.second(i, cpu, dtype)
            width = kg * ka if Q is None else Q.shape[1]
            for n, part in zip(b.params, parts):
                o = self.offsets[n]
                R[o:o + part.shape[0], col:col + width] = part if Q is None else part @ Q
            col += width
        return R
