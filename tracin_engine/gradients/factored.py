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
(k_r k_c up to 16 s or WIDE_CAP) and then by a seeded dense Gaussian Q (k_r k_c, s): the Kronecker
step alone would have relative variance ~ 1/k_r + 1/k_c ~ 2/sqrt(s) (see _allocate). A block with a
large share whose gradient is nearly rank one in a wide space (GPT-2's tied wte / lm_head: 5000 x 256)
is projected "paired" (Khatri-Rao) instead: z_m = p_m^T dW q_m = sum_t (p_m . r_t)(q_m . c_t),
m = 1..s, with independent Gaussian columns p_m (R,), q_m (C,): variance ~ 3/s whatever the rank.

proj_dim is the row length budget, shared over blocks in proportion to their gradients' mean squared
norms (the variance of a projected inner product of block b is ~ |x_b|^2 |y_b|^2 / s_b, so
sum_b m_b^2 / s_b is least for s_b ~ m_b), measured on a pilot batch (TracIn.resolve: the first 16
training examples at up to 4 checkpoints; `calibrate`), with 5% of proj_dim shared equally; blocks
whose exact row fits their share are exact (water-filling). The allocation is stored with the index
(metadata "projection_allocation") and adopted on resume and reload, never recomputed.
"""

from __future__ import annotations

from typing import Collection

import torch

from ..errors import TracInError
from .hooks import Contribution, HookFeaturizer, Unsupported
from .layers import Block
from .per_example import GradientComputer
from ..store.layout import Layout, Segment


def _factor(seed: int, layer: int, side: int, rows: int, k: int, kind: str, exact: bool = True) -> torch.Tensor:
    """(rows, k) seeded factor with E[P P^T] = I; the identity when k == rows (and `exact`)."""
    if k == rows and exact:
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


EQUAL_SHARE = 0.05   # part of proj_dim shared equally over blocks whatever their calibrated norms
WIDE_CAP = 16384     # largest first (Kronecker) stage k_r k_c of a two-stage block
DENSE_MAX_NUMEL = 2**17  # largest per-example weight gradient R x C formed to project a block (dense_route)
DENSE_GAIN = {"cpu": 1.0}  # ... where it needs fewer multiply-adds than this x the position-wise form (per
                           # device type; elsewhere 0.5: clear wins only, the GPU's kernels for it unmeasured)


class FactoredProjection(HookFeaturizer):
    """Projected rows (B, layout.dim <= proj_dim) of every handled block from hooks on one batched pass."""

    low_rank_rows = False

    def __init__(self, grads: GradientComputer, proj_dim: int, seed: int = 0, kind: str = "gaussian",
                 exclude: Collection[str] = ()):
        if kind not in ("gaussian", "rademacher"):
            raise TracInError(f"unknown factor kind {kind!r}; use 'gaussian' or 'rademacher'.")
        self.proj_dim, self.seed, self.kind = proj_dim, seed, kind
        self.weights: list[float] | None = None         # calibration: mean squared norm per block
        self.fixed: list[list[int]] | None = None       # an allocation adopted from a stored index
        self._cache: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            super().__init__(grads, exclude=exclude)
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
        if self.fixed is not None:
            self.k, self.k2, self.paired = self._checked(self.fixed)
        else:
            self.k, self.k2, self.paired = self._allocate(self.shapes, self.proj_dim, self.weights)
        self._cache.clear()
        segments, start = [], 0
        for i, (A, O, outer) in enumerate(self.shapes):
            ka, kg = self.k[i]
            seg = Segment("outer", start, ka, kg) if outer else Segment("dense", start, self.width(i))
            segments.append(seg)
            start += seg.size
        self.segments = segments
        self.layout = Layout(segments)

    # -- calibration and the stored allocation -------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        """Whether the shares are settled: calibrated, adopted from a stored index, or every block exact."""
        return self.weights is not None or self.fixed is not None or all(
            (k2 is None and k == (A, O) and not p) for (A, O, _), k, k2, p in
            zip(self.shapes, self.k, self.k2, self.paired))

    def width(self, i: int) -> int:
        """Numbers of block i's projected vector: k2 (two stages), s (paired), else k_r k_c."""
        ka, kg = self.k[i]
        return ka if self.paired[i] else (self.k2[i] or ka * kg)

    def block_sq_norms(self, rows: torch.Tensor) -> list[float]:
        """Mean over the rows (B, layout.dim) of each block's squared norm ||P^T g_b||^2: list (L,) floats.
        Unbiased estimates of E||g_b||^2 (E[R R^T] = I), exact for exact blocks."""
        out = []
        for seg in self.layout.segments:
            one = Layout([Segment(seg.kind, 0, seg.a_dim, seg.g_dim)])
            out.append(float(one.sq_norms(rows[:, seg.start:seg.start + seg.size]).mean()))
        return out

    def calibrate(self, weights: list[float]) -> None:
        """Share proj_dim by `weights` (L,) >= 0, the blocks' mean squared gradient norms (see _allocate)."""
        if len(weights) != len(self.blocks) or not all(w >= 0 and w < float("inf") for w in weights):
            raise TracInError(f"calibration needs {len(self.blocks)} finite non-negative block weights, got {weights}.")
        # three significant digits: runs whose float sums differ in the last bits (threads, ranks) share alike
        self.weights, self.fixed = [float(f"{w:.2e}") for w in weights], None
        self.relayout()

    def allocation(self) -> list[list[int]]:
        """Per block [k_c, k_r, k2, paired] (k2 0: no second stage; paired 1: Khatri-Rao columns, k_c = k_r
        = s): what the stored rows depend on (index metadata)."""
        return [[ka, kg, k2 or 0, int(p)] for (ka, kg), k2, p in zip(self.k, self.k2, self.paired)]

    def adopt_allocation(self, stored: list) -> None:
        """Use the allocation of a stored index (allocation()), so its rows and new ones agree."""
        self.fixed = [list(map(int, s)) for s in stored]
        self.relayout()

    def _checked(self, alloc: list[list[int]]) -> tuple[list[tuple[int, int]], list[int | None], list[bool]]:
        ok = len(alloc) == len(self.shapes) and all(len(a) == 4 for a in alloc) and all(
            (p == 1 and ka == kg >= 1 and k2 == 0 and not outer and O > 1) or
            (p == 0 and 1 <= ka <= A and 1 <= kg <= O and k2 >= 0)
            for (A, O, outer), (ka, kg, k2, p) in zip(self.shapes, alloc))
        if not ok:
            raise TracInError("the stored index's projection allocation does not fit this model's layers "
                              f"({len(alloc)} stored blocks, {len(self.shapes)} here); build the index again "
                              "with this model and layers=.")
        return [(a[0], a[1]) for a in alloc], [a[2] or None for a in alloc], [bool(a[3]) for a in alloc]

    @staticmethod
    def _allocate(shapes: list[tuple[int, int, bool]], budget: int, weights: list[float] | None = None,
                  equal: float = EQUAL_SHARE, wide_cap: int = WIDE_CAP
                  ) -> tuple[list[tuple[int, int]], list[int | None], list[bool]]:
        """Per block (k_a, k_g), k2 and paired: the row gets k2 numbers (a second, dense Gaussian stage Q
        applied to the (k_g, k_a) Kronecker projection), s numbers (paired: Khatri-Rao, k_a = k_g = s) or,
        k2 None, k_g k_a (dense) / k_a + k_g (outer) numbers.

        Shares: a projected inner product of block b has variance ~ |x_b|^2 |y_b|^2 / s_b, so the total
        sum_b m_b^2 / s_b (m_b the mean squared norm of block b's gradient, `weights`) is least with
        s_b proportional to m_b. Each block's share is proportional to (1 - equal) m_b / sum m + equal / L
        (L blocks; equal = 1 or weights None: equal shares), water-filled: a block whose exact row fits its
        share is stored exactly and the rest share what is left.
        A dense block's Kronecker projection alone has relative variance ~ 1/k_a + 1/k_g, with
        k_a k_g = its share s (~2/sqrt(s)); projecting a wider one, k_a k_g = I = min(A O, 16 s, wide_cap),
        down to s with Q (I, s) gives ~ 1/k_a + 1/k_g + 1/s, much smaller; Q holds I s numbers.
        The Kronecker term stays when a block's gradient is nearly rank one in a wide space (a tied
        embedding / LM head: V rows); the paired (Khatri-Rao) projection z_m = p_m^T dW q_m, m = 1..s,
        with independent p_m, q_m has variance <= ~3/s (fourth moments of Gaussians) whatever the rank,
        and is taken when 3/s is below the two-stage 1/k_a + 1/k_g + 1/s; it costs T (R + C) s per
        example (the two factors' products), so only blocks with a large share use it.
        """
        L = len(shapes)
        exact = [A + O if outer else A * O for A, O, outer in shapes]
        if weights is None or not sum(weights) > 0:
            mix = [1.0 / L] * L
        else:
            total = float(sum(weights))
            mix = [(1 - equal) * float(w) / total + equal / L for w in weights]
        share: dict[int, float] = {}
        left, free = float(budget), set(range(L))
        while free:
            wsum = sum(mix[i] for i in free)
            fit = [i for i in free if exact[i] <= left * mix[i] / wsum]
            if not fit:
                for i in free:
                    share[i] = left * mix[i] / wsum
                break
            for i in fit:
                share[i] = exact[i]
                left -= exact[i]
                free.discard(i)
        sizes = [exact[i] if share[i] >= exact[i] else max(2, int(share[i])) for i in range(L)]
        over = sum(sizes) - budget      # the floor of 2 numbers can overshoot: the largest pay, down to 2 each
        for i in sorted(range(L), key=lambda i: -sizes[i]):   # (budget >= 2 L: sum(sizes - 2) >= over)
            if over <= 0:
                break
            cut = min(over, sizes[i] - 2)
            sizes[i] -= cut
            over -= cut
        k: list[tuple[int, int] | None] = [None] * L
        k2: list[int | None] = [None] * L
        paired = [False] * L
        for i, (A, O, outer) in enumerate(shapes):
            s = sizes[i]
            if exact[i] <= s:
                k[i] = (A, O)
            elif outer or O == 1:
                k[i] = _split(s, A, O, outer)
            else:
                wide = min(A * O, 16 * s, max(wide_cap, s))
                if wide > s:
                    k[i], k2[i] = _split(wide, A, O, False), s
                else:
                    k[i] = _split(s, A, O, False)
                ka, kg = k[i]
                kron = (0 if ka == A else 1 / ka) + (0 if kg == O else 1 / kg) + (1 / s if k2[i] else 0)
                if 3 / s < kron:
                    k[i], k2[i], paired[i] = (s, s), None, True
        return k, k2, paired

    def factors(self, i: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_c (A, k_c), P_r (R, k_r)) of block i: generated on the CPU from the seed, so every device,
        run and process (train and test) gets the same numbers."""
        key = (i, device, dtype)
        if key not in self._cache:
            (A, O, _), (ka, kg) = self.shapes[i], self.k[i]
            if self.paired[i]:   # columns p_m (R, s) with E[p p^T] = I / s, q_m (C, s) with E[q q^T] = I
                self._cache[key] = ((_factor(self.seed, i, 3, A, ka, self.kind, False) * ka ** 0.5).to(device, dtype),
                                    _factor(self.seed, i, 4, O, kg, self.kind, False).to(device, dtype))
            else:
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
        if self.dense_route(i, b, contrib):
            self._dense_rows(i, b, contrib[0], Pa, Pg, Pw, pb, out)
            return
        if self.paired[i]:       # z_m = sum_t (p_m . r_t)(q_m . c_t)
            for j, (h, ctx, g) in enumerate(contrib):
                z = torch.linalg.vecdot(h.proj_rows(ctx, g, Pg), h.proj_cols(ctx, g, Pw, pb), dim=1)   # (B, s)
                out.copy_(z) if j == 0 else out.add_(z)
            return
        Z = None
        for h, ctx, g in contrib:
            z = torch.bmm(h.proj_rows(ctx, g, Pg).transpose(1, 2), h.proj_cols(ctx, g, Pw, pb))  # (B, k_r, k_c)
            Z = z if Z is None else Z.add_(z)
        Q = self.second(i, g0.device, g0.dtype)
        out.copy_(Z.flatten(1) if Q is None else Z.flatten(1) @ Q)

    @staticmethod
    def _dense_candidate(b: Block) -> bool:
        """Whether the dense route may ever form block b's dW_b: a kron block stored dense, with one use, a
        handler with dense gradients (not an Embedding) and at most DENSE_MAX_NUMEL weights."""
        return (b.kind == "kron" and not b.outer and len(b.uses) == 1 and not b.uses[0].handler.sparse_grad
                and b.R * b.C <= DENSE_MAX_NUMEL)

    def dense_numel(self) -> int:
        """Numbers per example of the largest dW_b the dense route may form (0 when none can)."""
        return max([b.R * b.C for b in self.blocks if self._dense_candidate(b)], default=0)

    def dense_route(self, i: int, b: Block, contrib: list[Contribution]) -> bool:
        """Whether block i is cheaper projected from its per-example gradients dW_b (B, R, C) than position
        by position. Per example, in multiply-adds (T positions, R rows, C cols, k_c / k_r the factors):
            by positions:  T (R k_r + C k_c) + T k_r k_c   (paired: T (R + C) s + T s)
            dense:         T R C + R C k_c + R k_c k_r     (paired: T R C + R C s + R s)
        (the same products in another order). Dense wins where positions are many and channels few (the
        early convolutions of a small CNN: 32 x 32 positions, 16-32 channels, a few hundred projected
        columns; CifarNet(16) on the CPU: factored rows 2.3x faster) and is taken there, when dW_b has at
        most DENSE_MAX_NUMEL numbers (one use, no tied parameters, not an Embedding). On the CPU whichever
        needs fewer multiply-adds; on other devices only where the dense way needs at most half (DENSE_GAIN:
        the GPU kernels of the two ways have not been timed against each other)."""
        if len(contrib) != 1 or not self._dense_candidate(b):   # one call of its one use
            return False
        h, ctx, g = contrib[0]
        T, R, C = h.positions(ctx, g), b.R, b.a_dim
        ka, kg = self.k[i]
        if self.paired[i]:
            by_positions, dense = T * (R + C) * ka + T * ka, T * R * C + R * C * ka + R * ka
        else:
            by_positions, dense = T * (R * kg + C * ka) + T * kg * ka, T * R * C + R * C * ka + R * ka * kg
        return dense < DENSE_GAIN.get(g.device.type, 0.5) * by_positions

    def _dense_rows(self, i: int, b: Block, contrib: Contribution, Pa: torch.Tensor, Pg: torch.Tensor,
                    Pw: torch.Tensor, pb: torch.Tensor | None, out: torch.Tensor) -> None:
        """Block i's row from dW_b = sum_t r_bt c_bt^T (the handler's exact per-example gradient, B x R x C):
        paired z_m = p_m^T [dW, bias] q_m; else P_r^T [dW, bias] P_c, then Q."""
        h, ctx, g = contrib
        flat = torch.empty(g.shape[0], b.R * b.C, dtype=g.dtype, device=g.device)
        h.grad_into(ctx, g, flat)
        dW, (ka, kg) = h.from_params(flat), self.k[i]                              # (B, R, C)
        if not self.paired[i] and ka == b.a_dim:                                   # P_c is the identity
            M = dW if pb is None else torch.cat([dW, h.bias_grad(ctx, g).unsqueeze(2)], 2)
        else:
            M = torch.matmul(dW, Pw)                                               # (B, R, k_c)
            if pb is not None:
                M.add_(h.bias_grad(ctx, g).unsqueeze(2) * pb)
        if self.paired[i]:
            out.copy_((M * Pg).sum(1))                                             # (B, s)
            return
        Z = M if kg == b.R else torch.matmul(Pg.T, M)                              # (B, k_r, k_c)
        Q = self.second(i, g.device, g.dtype)
        out.copy_(Z.flatten(1) if Q is None else Z.flatten(1) @ Q)

    def generic_rows(self, i: int, b: Block, flat: torch.Tensor, out: torch.Tensor) -> None:
        Pa, _ = self.factors(i, flat.device, flat.dtype)
        out.copy_(flat if self.k[i][0] == b.n else flat @ Pa)

    # -- checks and the equivalent dense projection (slow; for tests and small models) ---------------
    def block_sums(self, rows: torch.Tensor) -> list[torch.Tensor]:
        E = self.expand(rows).sum(0)
        return list(E.split([self.width(i) for i in range(len(self.blocks))]))

    def block_reference(self, b: Block, grads: list[torch.Tensor]) -> torch.Tensor:
        return self._project_block(self.blocks.index(b), [g.reshape(1, -1) for g in grads])[0]

    def _project_block(self, i: int, parts: list[torch.Tensor]) -> torch.Tensor:
        """Block i's projection (B, width) of explicit gradients, one (B, numel) tensor per parameter of the
        block: vector / generic [parts] P_a; kron [W, bias] as (B, R, C'): paired z_m = p_m^T W q_m, else
        vec(P_r^T W P_c), then Q."""
        b = self.blocks[i]
        Pa, Pg = self.factors(i, parts[0].device, parts[0].dtype)
        if b.kind != "kron":
            return torch.cat(parts, 1) @ Pa
        W = b.uses[0].handler.from_params(parts[0])
        if b.has_bias:
            W = torch.cat([W, parts[1].unsqueeze(2)], 2)
        if self.paired[i]:
            return (Pg * (W @ Pa)).sum(1)
        Z = (Pg.T @ W @ Pa).flatten(1)
        Q = self.second(i, Z.device, Z.dtype)
        return Z if Q is None else Z @ Q

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat gradients (B, P) (GradientComputer order) -> (B, D) = flat @ matrix(), the expanded rows'
        space (expand), block by block without forming the matrix (SOURCE's v(z))."""
        return torch.cat([self._project_block(i, [flat[:, self.offsets[n]:self.offsets[n] + self._numel(n)]
                                                  for n in b.params]) for i, b in enumerate(self.blocks)], 1)

    @property
    def expanded_dim(self) -> int:
        """D, the width of expand(rows) and project_flat."""
        return sum(self.width(i) for i in range(len(self.blocks)))

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
        D = sum(self.width(i) for i in range(len(self.blocks)))
        R = torch.zeros(self.grads.num_params, D, dtype=dtype)
        col = 0
        for i, b in enumerate(self.blocks):
            Pa, Pg = self.factors(i, cpu, dtype)
            (A, O, _), (ka, kg) = self.shapes[i], self.k[i]
            if b.kind == "kron":
                K = (torch.einsum("om,nm->onm", Pg, Pa) if self.paired[i]          # row (o, n), col m
                     else torch.einsum("oi,nj->onij", Pg, Pa).reshape(O, A, kg * ka))  # col (i, j)
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
            width = self.width(i)
            for n, part in zip(b.params, parts):
                o = self.offsets[n]
                R[o:o + part.shape[0], col:col + width] = part if Q is None else part @ Q
            col += width
        return R
