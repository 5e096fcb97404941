"""Seeded random projections of flattened gradients, pure PyTorch, no compile step.

Example:
    >>> proj = RandomProjection(in_dim=P, proj_dim=1024, seed=0)
    >>> Z = proj(G)                      # G: (B, P) -> Z: (B, 1024)

Z = G R / sqrt(proj_dim), R (P, proj_dim) with i.i.d. N(0, 1) (kind="gaussian") or +-1
(kind="rademacher") entries, so E[<Z_a, Z_b>] = <G_a, G_b> (Johnson-Lindenstrauss: for n vectors the
inner products of unit vectors are kept within eps with proj_dim ~ 8 log(n) / eps^2).
R is generated in row blocks of `block_rows` from (seed, block) so it is never held whole unless
it is small enough to cache (cache_bytes); train and test use the same seed and get the same R.
Blocks are drawn on the CPU from (seed, block), so R does not depend on the device.

build_projection(kind, grads, proj_dim, seed) picks this dense projection ("gaussian",
"rademacher") or the per-layer FactoredProjection ("factored", see factored.py), which is much
faster for Linear/Conv2d models because it never forms the flat per-example gradient.
"""

from __future__ import annotations

import torch

from ..errors import TracInError


class RandomProjection:
    """Z = G @ R / sqrt(proj_dim); R generated blockwise from `seed`."""

    def __init__(self, in_dim: int, proj_dim: int, seed: int = 0, kind: str = "gaussian",
                 block_rows: int = 4096, cache_bytes: int = 2**30):
        if proj_dim <= 0:
            raise TracInError(f"proj_dim must be a positive integer, got {proj_dim}.")
        if kind not in ("gaussian", "rademacher"):
            raise TracInError(f"unknown projection kind {kind!r}; use 'gaussian' or 'rademacher'.")
        self.in_dim, self.proj_dim, self.seed, self.kind = in_dim, proj_dim, seed, kind
        self.block_rows = block_rows
        self._cache_ok = in_dim * proj_dim * 4 <= cache_bytes
        self._cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def block(self, b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Rows [b*block_rows, (b+1)*block_rows) of R: Tensor (rows, proj_dim)."""
        key = (b, device, dtype)
        if key in self._cache:
            return self._cache[key]
        rows = min(self.block_rows, self.in_dim - b * self.block_rows)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + b)
        if self.kind == "gaussian":
            r = torch.randn(rows, self.proj_dim, generator=gen)
        else:
            r = torch.randint(0, 2, (rows, self.proj_dim), generator=gen).float().mul_(2).sub_(1)
        r = r.to(device=device, dtype=dtype)
        if self._cache_ok:
            self._cache[key] = r
        return r

    @property
    def dim(self) -> int:
        return self.proj_dim

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """R / sqrt(proj_dim) whole: Tensor (in_dim, proj_dim) (slow reference, small in_dim only)."""
        blocks = [self.block(b, torch.device("cpu"), torch.float32)
                  for b in range(-(-self.in_dim // self.block_rows))]
        return torch.cat(blocks).to(dtype) / self.proj_dim ** 0.5

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        """grads (B, in_dim) -> (B, proj_dim), accumulated in the input dtype (float32 or wider)."""
        if grads.shape[1] != self.in_dim:
            raise TracInError(f"projection expects {self.in_dim} gradient entries, got {grads.shape[1]}.")
        dtype = grads.dtype if grads.dtype in (torch.float32, torch.float64) else torch.float32
        out = torch.zeros(grads.shape[0], self.proj_dim, device=grads.device, dtype=dtype)
        for b, start in enumerate(range(0, self.in_dim, self.block_rows)):
            stop = min(start + self.block_rows, self.in_dim)
            out.addmm_(grads[:, start:stop].to(dtype), self.block(b, grads.device, dtype))
        return out.div_(self.proj_dim ** 0.5)


def build_projection(kind: str, grads, proj_dim: int | None, seed: int = 0):
    """None (exact), a RandomProjection ("gaussian" / "rademacher") or a FactoredProjection ("factored")."""
    if kind not in ("gaussian", "rademacher", "factored"):
        raise TracInError(f"unknown projection {kind!r}; use 'gaussian', 'rademacher' or 'factored'.")
    if proj_dim is None:
        return None
    if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim <= 0:
        raise TracInError(f"proj_dim must be None (exact) or a positive integer, got {proj_dim!r}.")
    if kind == "factored":
        from .factored import FactoredProjection

        return FactoredProjection(grads, proj_dim, seed)
    return RandomProjection(grads.num_params, proj_dim, seed, kind)
