"""Seeded random projections of flattened gradients, pure PyTorch, no compile step.

Example:
    >>> proj = RandomProjection(in_dim=P, proj_dim=1024, seed=0)
    >>> Z = proj(G)                      # G: (B, P) -> Z: (B, 1024)

Z = G R / sqrt(proj_dim), R (P, proj_dim) with i.i.d. N(0, 1) (kind="gaussian") or +-1
(kind="rademacher") entries, so E[<Z_a, Z_b>] = <G_a, G_b> (Johnson-Lindenstrauss: for n vectors the
inner products of unit vectors are kept within eps with proj_dim ~ 8 log(n) / eps^2).
R is generated in row blocks of `block_rows` on the computing device, from the seed alone, by a
counter-based generator that gives bit-identical numbers on every device (CPU, CUDA, any count
of threads): entry (i, j) of R for seed s is
    key   = mix32(mix32(s mod 2^32) ^ mix32(floor(s / 2^32) mod 2^32))
    h     = mix32(mix32(i ^ key) ^ mix32((j + 0x9E3779B9) mod 2^32))       (32-bit integers)
    gaussian:   R_ij = Q[h >> 12],  Q[t] = float32(c Phi^-1((t + 1/2) / 2^20)), t = 0 .. 2^20 - 1
    rademacher: R_ij = +1 if h >> 31 else -1
with mix32(x) = x1 ^ (x1 >> 16), x1 = ((x0 ^ (x0 >> 16)) * 0x45D9F3B) mod 2^32,
x0 = ((x ^ (x >> 16)) * 0x45D9F3B) mod 2^32, and c making the mean of Q^2 exactly 1 (Q is a
Gaussian quantized to 2^20 equally likely levels, |Q| <= 4.9: for Johnson-Lindenstrauss any unit
variance sub-Gaussian entry is as good). Only integer operations and a table lookup are involved,
so no device's rounding can change a bit. GENERATOR names this scheme in index metadata.
R is cached once per (device, dtype) when it fits (cache_bytes, default a quarter of the device's
free memory); a larger R is regenerated block by block on the device for every batch (about
ten integer passes per entry: cheap on a GPU, never on the CPU side of a CUDA run).

build_projection(kind, grads, proj_dim, seed) picks this dense projection ("gaussian",
"rademacher") or the per-layer FactoredProjection ("factored", see factored.py), which is much
faster because it never forms the flat per-example gradient; "auto" (TracIn's default) takes the
factored one wherever layer handlers cover the model.
"""

from __future__ import annotations

import warnings

import torch

from ..errors import TracInError
from ..memory import fits

GENERATOR = "hash32-ndtri20-v1"  # recorded in index metadata: R depends on it
_MASK = 0xFFFFFFFF
_MULT = 0x45D9F3B
_TABLE_BITS = 20
_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit integer hash of the module docstring on int64 tensors holding values in [0, 2^32).
    Products stay below 2^59, so int64 arithmetic is exact on every device."""
    x = x.clone()
    for _ in range(2):  # in place: no fresh allocation per step
        x ^= x >> 16
        x *= _MULT
        x &= _MASK
    x ^= x >> 16
    return x


def _mix_int(v: int) -> int:
    return int(mix32(torch.tensor([v & _MASK], dtype=torch.int64))[0])


def gaussian_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Q (2^20,): Gaussian quantiles at the centres of 2^20 equal-probability cells, scaled to unit
    mean square; computed once in float64 on the CPU and rounded to float32 there (so R has the same
    numbers in every dtype that holds float32 exactly), then converted to `dtype` and moved."""
    key = (torch.device(device), dtype)
    if key not in _tables:
        if (torch.device("cpu"), torch.float64) not in _tables:
            t = torch.arange(2**_TABLE_BITS, dtype=torch.float64)
            q = torch.special.ndtri((t + 0.5) / 2**_TABLE_BITS)
            _tables[(torch.device("cpu"), torch.float64)] = (q / q.pow(2).mean().sqrt()).float().double()
        _tables[key] = _tables[(torch.device("cpu"), torch.float64)].to(dtype).to(device)
    return _tables[key]


def projection_entries(seed: int, row0: int, rows: int, cols: int, kind: str, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
    """R[row0:row0 + rows, :cols] for `seed` (module docstring), drawn on `device`: Tensor (rows, cols)."""
    key = _mix_int(_mix_int(seed & _MASK) ^ _mix_int((seed >> 32) & _MASK))
    i = torch.arange(row0, row0 + rows, dtype=torch.int64, device=device)
    j = torch.arange(cols, dtype=torch.int64, device=device)
    h = mix32(mix32(i ^ key).unsqueeze(1) ^ mix32((j + 0x9E3779B9) & _MASK).unsqueeze(0))
    if kind == "gaussian":
        return gaussian_table(device, dtype)[h >> (32 - _TABLE_BITS)]
    return (h >> 31).to(dtype).mul_(2).sub_(1)


class RandomProjection:
    """Z = G @ R / sqrt(proj_dim); R generated blockwise from `seed`."""

    generator = GENERATOR

    def __init__(self, in_dim: int, proj_dim: int, seed: int = 0, kind: str = "gaussian",
                 block_rows: int = 4096, cache_bytes: int | None = None):
        if proj_dim <= 0:
            raise TracInError(f"proj_dim must be a positive integer, got {proj_dim}.")
        if kind not in ("gaussian", "rademacher"):
            raise TracInError(f"unknown projection kind {kind!r}; use 'gaussian' or 'rademacher'.")
        if in_dim >= 2**32 or proj_dim >= 2**32:
            raise TracInError(f"a dense projection of {in_dim} x {proj_dim} is beyond the 32-bit generator; "
                              "select fewer layers or use projection='factored'.")
        self.in_dim, self.proj_dim, self.seed, self.kind = in_dim, proj_dim, seed, kind
        self.block_rows = block_rows
        self.cache_bytes = cache_bytes
        self._cache_ok: dict[tuple[torch.device, torch.dtype], bool] = {}
        self._cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self.generated_blocks = 0  # blocks drawn so far (a cached R is drawn once)

    def cached(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether R is kept on (device, dtype) once drawn: it fits cache_bytes (default: a quarter of
        the device's free memory when first asked)."""
        key = (torch.device(device), dtype)
        if key not in self._cache_ok:
            nbytes = self.in_dim * self.proj_dim * torch.empty((), dtype=dtype).element_size()
            self._cache_ok[key] = (nbytes <= self.cache_bytes if self.cache_bytes is not None
                                   else fits(nbytes, device, fraction=0.25))
        return self._cache_ok[key]

    def block(self, b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Rows [b*block_rows, (b+1)*block_rows) of R: Tensor (rows, proj_dim), drawn on `device`."""
        device = torch.device(device)
        key = (b, device, dtype)
        if key in self._cache:
            return self._cache[key]
        rows = min(self.block_rows, self.in_dim - b * self.block_rows)
        r = projection_entries(self.seed, b * self.block_rows, rows, self.proj_dim, self.kind, device, dtype)
        self.generated_blocks += 1
        if self.cached(device, dtype):
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
    """None (exact), a RandomProjection ("gaussian" / "rademacher") or a FactoredProjection ("factored";
    "auto": factored where layer handlers cover the selected parameters, else gaussian with a warning)."""
    if kind not in ("auto", "gaussian", "rademacher", "factored"):
        raise TracInError(f"unknown projection {kind!r}; use 'auto', 'factored', 'gaussian' or 'rademacher'.")
    if proj_dim is None:
        return None
    if not isinstance(proj_dim, int) or isinstance(proj_dim, bool) or proj_dim <= 0:
        raise TracInError(f"proj_dim must be None (exact) or a positive integer, got {proj_dim!r}.")
    if kind in ("factored", "auto"):
        from .factored import FactoredProjection

        try:
            return FactoredProjection(grads, proj_dim, seed)
        except TracInError as exc:
            if kind == "factored":
                raise
            warnings.warn(f"projection='auto': {exc} Using the dense Gaussian projection (slower).", stacklevel=3)
            kind = "gaussian"
    return RandomProjection(grads.num_params, proj_dim, seed, kind)
