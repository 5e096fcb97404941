"""Blocked scores between test features and the stored training features.

With per-checkpoint test features T_c (m, D), stored features F_c (n, D) and weights eta_c:
    influence  S = sum_c eta_c <T_c, F_c>                                   (m, n)
    similarity S = sum_c w_c <T_c, F_c> / (|T_c| |F_c|), w_c = eta_c / sum eta   in [-1, 1]
where <., .> and |.| are those of the gradients the rows represent (Layout.dots / sq_norms).
    self-influence s(z) = sum_c eta_c ||F_c(z)||^2                            (n,)
Training rows are visited in blocks of `block_size`, so the full (m, n) matrix is never needed by
top-k; accumulation is float32 (float64 when the features are float64).

Half-precision stores on the CPU (float16/bfloat16, at most half_max_test_rows test rows): the
products are taken in the store's dtype by `half_matmul`, without a float32 copy of the block
(benchmarks/bench_scale.py, 50,000 x 4096 float16 rows x 4 checkpoints, one CPU thread: scoring
0.33 s instead of 2 s). Each plain product x . y (a dense segment t_s . f_s, or one factor
t_a . f_a / t_g . f_g of an outer segment) is then within
    u |x . y| + 3 u^2 |x| |y|   (+ 2^-25 |x| for float16 outputs below 2^-14 |x|: subnormal)
of its exact value on the same stored rows, u = 2^-11 (float16) or 2^-8 (bfloat16): the half
rounding of the output (the float32 accumulation inside the kernel adds what the float32 path has
too). A score's error is thus at most about u sum_c eta_c sum_s |term_cs| (2u for outer terms): no
more than the rounding of the stored rows already allows (u sum_i |t_i f_i| >= u |t . f|).
Tests: tests/test_scoring_half.py.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import torch

from .layout import Layout
from .feature_store import FeatureStore


HALF_DTYPES = (torch.float16, torch.bfloat16)
HALF_MAX_TEST_ROWS = 32  # measured (2-core AVX512-FP16 CPU): beyond this a float32 copy of the block is faster
HALF_MAX_TEST_ROWS_EMULATED = 4  # CPUs without native half dot products (AVX2 simulated: break-even ~8)


@lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def half_max_test_rows(store_dtype: torch.dtype) -> int:
    """Most test rows for which half products beat a float32 copy: HALF_MAX_TEST_ROWS with native
    AVX512-FP16 (float16) / AVX512-BF16 or AMX-BF16 (bfloat16) dot products, else
    HALF_MAX_TEST_ROWS_EMULATED."""
    native = {"avx512_fp16"} if store_dtype == torch.float16 else {"avx512_bf16", "amx_bf16"}
    return HALF_MAX_TEST_ROWS if native & _cpu_flags() else HALF_MAX_TEST_ROWS_EMULATED


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on rows of `dtype` runs in: float64 for float64 rows, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def half_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y.T for x (m, k) float32 and y (b, k) float16/bfloat16 -> (m, b) float32, multiplying in
    y's dtype (y is never copied to float32).

    Row by row x = |x| (hi + lo / s) with s = 1/u (2^11 float16, 2^8 bfloat16), hi = half(x / |x|)
    and lo = half(s (x / |x| - hi)), so |hi|, |lo| <= 1 up to rounding. One half product
    [hi; lo] @ y.T (CPU kernels accumulate in float32, then round the output to half), combined in
    float32 as |x| (hi.y + (lo.y) / s). Every output is bounded by |y_j|, so float16 cannot overflow
    unless a stored row has norm > 65504; if any output is not finite, the product is redone in
    float32. Error: see the module docstring.
    """
    lo_scale = 2.0 / torch.finfo(y.dtype).eps
    norms = x.norm(dim=1, keepdim=True)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    unit = x / norms
    hi = unit.to(y.dtype)
    lo = ((unit - hi.to(x.dtype)) * lo_scale).to(y.dtype)
    out = torch.cat([hi, lo]) @ y.T  # (2m, b) in y's dtype
    if not torch.isfinite(torch.linalg.vector_norm(out, float("inf"))):  # overflow (or NaN rows)
        return x @ y.to(x.dtype).T
    m = x.shape[0]
    return torch.add(out[:m].to(x.dtype), out[m:], alpha=1 / lo_scale).mul_(norms)


def uses_half_products(store_dtype: torch.dtype, device: torch.device, m: int) -> bool:
    """Whether score_blocks multiplies in the store's dtype (half_matmul): float16/bfloat16 rows on
    the CPU and at most half_max_test_rows(dtype) test rows. Elsewhere the block is converted to float32
    (float64 stores: float64; CUDA: float32 products, unchanged)."""
    return store_dtype in HALF_DTYPES and device.type == "cpu" and m <= half_max_test_rows(store_dtype)


def _inv_norms(sq_norms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return sq_norms.sqrt().to(dtype).clamp_min(torch.finfo(dtype).tiny).reciprocal()


def default_block_size(m: int, n_checkpoints: int, per_checkpoint: bool, budget_bytes: int = 2**28) -> int:
    """Training rows per block so that one block of scores stays near `budget_bytes` (>= 1024 rows)."""
    per_row = 4 * max(m, 1) * (n_checkpoints + 1 if per_checkpoint else 2)
    return max(1024, budget_bytes // per_row)


def score_blocks(test_feats: torch.Tensor, store: FeatureStore, weights: torch.Tensor, layout: Layout,
                 normalize: bool = False, block_size: int | None = None, per_checkpoint: bool = False,
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, scores) for training rows start..start+b.

    test_feats: (C, m, D) rows of `layout`. weights: (C,). scores: (m, b), or (C, m, b) when
    per_checkpoint. normalize=True divides each term by |g_c(z')| |g_c(z)| (cosines; the weights
    should then sum to 1 for a similarity). block_size None: about 256 MB of scores per block.
    float16/bfloat16 stores on the CPU with m <= half_max_test_rows(dtype) multiply in half precision
    (half_matmul; error bound in the module docstring); otherwise each block is converted to float32.
    """
    block_size = block_size or default_block_size(test_feats.shape[1], store.n_checkpoints, per_checkpoint)
    dtype = accum_dtype(store.dtype)
    device = test_feats.device
    t = test_feats.to(dtype)
    t_inv = [_inv_norms(layout.sq_norms(t[c]), dtype) for c in range(len(t))] if normalize else None
    w = weights.to(device=device, dtype=dtype)
    half = uses_half_products(store.dtype, device, t.shape[1])
    matmul, f_dtype = (half_matmul, store.dtype) if half else (None, dtype)
    for start in range(0, store.n, block_size):
        stop = min(start + block_size, store.n)
        total = torch.zeros(store.n_checkpoints if per_checkpoint else 1, t.shape[1], stop - start,
                            dtype=dtype, device=device)
        for c in range(store.n_checkpoints):
            f = store.features(c)[start:stop].to(device=device, dtype=f_dtype)
            d = layout.dots(t[c], f, matmul)
            if normalize:
                d = d * t_inv[c].unsqueeze(1) * _inv_norms(store.sq_norms[c, start:stop].to(device), dtype)
            total[c if per_checkpoint else 0].add_(d, alpha=float(w[c]))
        yield start, (total if per_checkpoint else total[0])


def full_scores(test_feats: torch.Tensor, store: FeatureStore, weights: torch.Tensor, layout: Layout,
                normalize: bool = False, per_checkpoint: bool = False) -> torch.Tensor:
    """All scores at once: (m, n), or (C, m, n) when per_checkpoint."""
    blocks = [s for _, s in score_blocks(test_feats, store, weights, layout, normalize,
                                         per_checkpoint=per_checkpoint)]
    return torch.cat(blocks, dim=-1)


def self_influence(store: FeatureStore, weights: torch.Tensor, per_checkpoint: bool = False) -> torch.Tensor:
    """s(z) = sum_c eta_c ||F_c(z)||^2 from stored squared norms: (n,), or (C, n) terms."""
    terms = weights.to(torch.float64).unsqueeze(1) * store.sq_norms
    return terms if per_checkpoint else terms.sum(0)
