"""How a stored feature row represents a per-example gradient, exactly, in fewer numbers.

Example:
    >>> lay = Layout.dense_of(P)                    # row = the flat gradient (or its projection)
    >>> lay = Layout([Segment("dense", 0, 80), Segment("outer", 80, 577, 32)])
    >>> lay.dots(T, F)                              # (m, b) exact <g(z'), g(z)>
    >>> lay.sq_norms(F)                             # (b,) ||g(z)||^2

A Linear layer's per-example weight gradient is the outer product g a^T of its output gradient g
(out,) and input a (in,) (bias: append 1 to a). Storing a and g ("outer" segment: a_dim + g_dim
numbers instead of a_dim * g_dim) keeps inner products exact:
    <g1 a1^T, g2 a2^T> = (g1 . g2) (a1 . a2),   ||g a^T||^2 = ||g||^2 ||a||^2.
A convolution with few output positions T has per-example gradient sum_t g_t a_t^T of rank <= T;
a "lowrank" segment stores the T pairs (T (a_dim + g_dim) numbers: first the T a_t, then the T g_t):
    <sum_t g_t a_t^T, sum_s h_s b_s^T> = sum_{t,s} (g_t . h_s)(a_t . b_s).
Dense segments store gradient entries as they are. Inner products of rows add over segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Matmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Segment:
    """kind "dense": columns [start, start + a_dim). kind "outer": a in [start, start + a_dim),
    g in [start + a_dim, start + a_dim + g_dim). kind "lowrank": `rank` vectors a_t (rank * a_dim
    numbers, t-major) then `rank` vectors g_t (rank * g_dim)."""

    kind: str
    start: int
    a_dim: int
    g_dim: int = 0
    rank: int = 0

    @property
    def size(self) -> int:
        return self.rank * (self.a_dim + self.g_dim) if self.kind == "lowrank" else self.a_dim + self.g_dim

    def parts(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A lowrank segment's (a (b, rank, a_dim), g (b, rank, g_dim)) from rows f (b, dim)."""
        mid = self.start + self.rank * self.a_dim
        return (f[:, self.start:mid].unflatten(1, (self.rank, self.a_dim)),
                f[:, mid:self.start + self.size].unflatten(1, (self.rank, self.g_dim)))


class Layout:
    """A list of segments covering a feature row of length `dim`."""

    def __init__(self, segments: list[Segment]):
        self.segments = list(segments)
        self.dim = sum(s.size for s in self.segments)
        self.outer = [s for s in self.segments if s.kind == "outer"]
        self.lowrank = [s for s in self.segments if s.kind == "lowrank"]
        self.dense = _merge_adjacent([s for s in self.segments if s.kind == "dense"])

    @classmethod
    def dense_of(cls, dim: int) -> "Layout":
        return cls([Segment("dense", 0, dim)])

    @property
    def is_dense(self) -> bool:
        return not self.outer and not self.lowrank

    def __repr__(self) -> str:
        return f"Layout(dim={self.dim}, dense={sum(s.a_dim for s in self.dense)}, outer={len(self.outer)})"

    def to_dict(self) -> list[list]:
        return [[s.kind, s.start, s.a_dim, s.g_dim] + ([s.rank] if s.kind == "lowrank" else []) for s in self.segments]

    def dots(self, t: torch.Tensor, f: torch.Tensor, matmul: Matmul | None = None) -> torch.Tensor:
        """Exact inner products of represented gradients: t (m, dim), f (b, dim) -> (m, b), t's dtype.

        Sum over dense segments of t_s f_s^T plus, over outer segments, (t_a f_a^T) * (t_g f_g^T).
        matmul(x (m, k), y (b, k)) -> (m, b) computes each of those plain products x y^T of column
        slices; default x @ y.T (f must then have t's dtype). Scoring passes `half_matmul` to keep
        float16/bfloat16 rows as they are.
        """
        matmul = matmul or _matmul
        if self.is_dense:
            return matmul(t, f)
        out = torch.zeros(t.shape[0], f.shape[0], dtype=t.dtype, device=t.device)
        for s in self.dense:
            out.add_(matmul(t[:, s.start:s.start + s.a_dim], f[:, s.start:s.start + s.a_dim]))
        for s in self.outer:
            a0, g0, g1 = s.start, s.start + s.a_dim, s.start + s.size
            out.add_(matmul(t[:, a0:g0], f[:, a0:g0]) * matmul(t[:, g0:g1], f[:, g0:g1]))
        for s in self.lowrank:
            _lowrank_dots(s, t, f, matmul, out)
        return out

    def sq_norms(self, f: torch.Tensor) -> torch.Tensor:
        """||g||^2 of each represented gradient: f (b, dim) -> (b,) float64.

        Row dot products in the rows' own precision (float32 accumulation, relative error ~1e-7;
        half rows are widened segment by segment), never a float64 copy of whole rows.
        """
        if self.is_dense:
            return _sq(f)
        total = torch.zeros(f.shape[0], dtype=torch.float64, device=f.device)
        for s in self.dense:
            total += _sq(f[:, s.start:s.start + s.a_dim])
        for s in self.outer:
            a0, g0, g1 = s.start, s.start + s.a_dim, s.start + s.size
            total += _sq(f[:, a0:g0]) * _sq(f[:, g0:g1])
        for s in self.lowrank:
            a, g = s.parts(f if f.dtype in (torch.float32, torch.float64) else f.float())
            total += (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2)).double()
        return total


_SQ_CHUNK = 4096   # columns per float32 partial sum of _sq (relative error ~2e-8 at 1.8 M columns)


def _lowrank_dots(s: Segment, t: torch.Tensor, f: torch.Tensor, matmul: Matmul, out: torch.Tensor) -> None:
    """out (m, b) += sum_{t,s} (a_t . b_s)(g_t . h_s) of one lowrank segment, in chunks of f's rows so the
    (m T, b T) products stay within 2^24 numbers."""
    m, T = t.shape[0], s.rank
    ta, tg = (x.reshape(m * T, -1) for x in s.parts(t))
    step = max(1, 2**24 // (m * T * T))
    for lo in range(0, f.shape[0], step):
        fa, fg = s.parts(f[lo:lo + step])
        n = fa.shape[0]
        prod = matmul(ta, fa.reshape(n * T, -1)) * matmul(tg, fg.reshape(n * T, -1))     # (m T, n T)
        out[:, lo:lo + n] += prod.view(m, T, n, T).sum((1, 3)).to(out.dtype)


def _sq(x: torch.Tensor) -> torch.Tensor:
    """Row squared norms (b,) float64 of x (b, k), any float dtype, read once without a copy: the norms of
    chunks of _SQ_CHUNK columns (one fused reduction over a (b, k // c, c) view; float32 accumulation,
    float64 for float64 rows), squared and added in float64. (x * x summed, as vecdot does, writes a copy
    of the rows: 1.75x slower on a ViT's exact rows.)"""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    b, k = x.shape
    full = (k // _SQ_CHUNK) * _SQ_CHUNK
    total = torch.zeros(b, dtype=torch.float64, device=x.device)
    if full:
        chunks = x[:, :full].reshape(b, full // _SQ_CHUNK, _SQ_CHUNK)
        total += torch.linalg.vector_norm(chunks, dim=2, dtype=acc).double().square().sum(1)
    if k > full:
        total += torch.linalg.vector_norm(x[:, full:], dim=1, dtype=acc).double().square()
    return total


def _matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (m, k), y (b, k) -> x @ y.T (m, b)."""
    return x @ y.T


def _merge_adjacent(dense: list[Segment]) -> list[Segment]:
    """Contiguous dense segments as one (fewer, larger products in `dots`)."""
    merged: list[Segment] = []
    for s in dense:
        if merged and merged[-1].start + merged[-1].a_dim == s.start:
            merged[-1] = Segment("dense", merged[-1].start, merged[-1].a_dim + s.a_dim)
        else:
            merged.append(s)
    return merged
