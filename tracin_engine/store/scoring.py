"""Blocked scores between test features and the stored training features.

With per-checkpoint test features T_c (m, D), stored features F_c (n, D) and weights eta_c:
    influence  S = sum_c eta_c <T_c, F_c>                                   (m, n)
    similarity S = sum_c w_c <T_c, F_c> / (|T_c| |F_c|), w_c = eta_c / sum eta   in [-1, 1]
where <., .> and |.| are those of the gradients the rows represent (Layout.dots / sq_norms).
    self-influence s(z) = sum_c eta_c ||F_c(z)||^2                            (n,)
Training rows are visited in blocks of `block_size`, so the full (m, n) matrix is never needed by
top-k; accumulation is float32 (float64 when the features are float64). Block sizes bound the
bytes of a block (its scores and its features, block_row_bytes) within the device's free memory,
and an out-of-memory error halves the block (memory.py). Scores are computed where the test
features are; the stored features reach that device through residency.DeviceFeatures (in place,
resident once, or streamed from pinned memory).

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

from ..devices import output_device, tf32_mode
from ..memory import Backoff, rows_that_fit
from .layout import Layout
from .feature_store import FeatureStore
from .residency import DeviceFeatures

BLOCK_BUDGET = {"cpu": 2**28, "cuda": 2**30}  # bytes per block: cache-sized on the CPU, larger on a GPU


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


def block_row_bytes(m: int, n_checkpoints: int, per_checkpoint: bool, dim: int = 0, itemsize: int = 4) -> int:
    """Device bytes one training row of a block needs while it is scored: its scores
    (m x (C + 1) per-checkpoint, else m x 2, accumulation dtype), its features in the stored dtype
    and upcast (dim x (itemsize + accum_itemsize)), and the products of the layout (2 m); the
    accumulation dtype is float64 for float64 features, else float32."""
    accum_itemsize = 8 if itemsize == 8 else 4
    scores = accum_itemsize * max(m, 1) * (n_checkpoints + 1 if per_checkpoint else 2)
    return scores + dim * (itemsize + accum_itemsize) + 2 * accum_itemsize * max(m, 1)


def default_block_size(m: int, n_checkpoints: int, per_checkpoint: bool, budget_bytes: int | None = None,
                       dim: int = 0, itemsize: int = 4, device: str | torch.device = "cpu") -> int:
    """Training rows per block so that one block's bytes (block_row_bytes: scores AND features)
    stay within `budget_bytes`; None: BLOCK_BUDGET[device type], at most a quarter of the device's
    free memory (memory.py). At least 1 row."""
    device = torch.device(device)
    cap = budget_bytes if budget_bytes is not None else BLOCK_BUDGET.get(device.type, BLOCK_BUDGET["cpu"])
    per_row = block_row_bytes(m, n_checkpoints, per_checkpoint, dim, itemsize)
    return rows_that_fit(per_row, device, fraction=0.25, cap_bytes=cap)


def score_blocks(test_feats: torch.Tensor, store: FeatureStore | DeviceFeatures, weights: torch.Tensor,
                 layout: Layout, normalize: bool = False, block_size: int | None = None,
                 per_checkpoint: bool = False, tf32: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, scores) for training rows start..start+b, computed on test_feats' device.

    test_feats: (C, m, D) rows of `layout`. store: a FeatureStore, or the DeviceFeatures a
    GradientIndex keeps (resident / streamed features, see residency.py). weights: (C,).
    scores: (m, b), or (C, m, b) when per_checkpoint, on test_feats' device. normalize=True divides
    each term by |g_c(z')| |g_c(z)| (cosines; the weights should then sum to 1 for a similarity).
    block_size None: default_block_size (a block's scores and features within the budget).
    float16/bfloat16 stores on the CPU with m <= half_max_test_rows(dtype) multiply in half precision
    (half_matmul; error bound in the module docstring); otherwise each block is upcast on the device.
    tf32: allow TF32 in the CUDA products (devices.tf32_mode; off by default).
    An out-of-memory error halves the block and scores it again (memory.Backoff); no block is yielded twice.
    """
    device = test_feats.device
    feats = store if isinstance(store, DeviceFeatures) else DeviceFeatures(store, device)
    dtype = accum_dtype(feats.dtype)
    block_size = block_size or default_block_size(test_feats.shape[1], feats.n_checkpoints, per_checkpoint,
                                                  dim=feats.dim, itemsize=feats.itemsize, device=device)
    t = test_feats.to(dtype)
    t_inv = [_inv_norms(layout.sq_norms(t[c]), dtype) for c in range(len(t))] if normalize else None
    w = weights.detach().to("cpu", torch.float64).tolist()  # Python floats: no device sync per block
    half = uses_half_products(feats.dtype, device, t.shape[1])
    matmul, f_dtype = (half_matmul, feats.dtype) if half else (None, dtype)

    def block(start: int, stop: int) -> torch.Tensor:
        total = torch.zeros(feats.n_checkpoints if per_checkpoint else 1, t.shape[1], stop - start,
                            dtype=dtype, device=device)
        for c in range(feats.n_checkpoints):
            f = feats.block(c, start, stop).to(device).to(f_dtype)  # upcast on the device
            with tf32_mode(tf32):
                d = layout.dots(t[c], f, matmul)
            if normalize:
                d = d * t_inv[c].unsqueeze(1) * _inv_norms(feats.sq_norms(c, start, stop).to(device), dtype)
            total[c if per_checkpoint else 0].add_(d, alpha=w[c])
        return total if per_checkpoint else total[0]

    size = Backoff(block_size, device, what="scoring block",
                   advice="pass block_size= smaller, or fewer test examples at once (test_chunk=).")
    start = 0
    while start < feats.n:
        scores = size.run(lambda b: block(start, min(start + b, feats.n)))
        yield start, scores
        start += scores.shape[-1]


def full_scores(test_feats: torch.Tensor, store: FeatureStore | DeviceFeatures, weights: torch.Tensor,
                layout: Layout, normalize: bool = False, per_checkpoint: bool = False, tf32: bool = False,
                out_device: str | torch.device | None = None) -> torch.Tensor:
    """All scores at once: (m, n), or (C, m, n) when per_checkpoint, on `out_device` (None: the CPU).

    Each block is moved to out_device as it comes, so the whole matrix never has to fit on the GPU."""
    out = output_device(out_device)
    blocks = [s.to(out) for _, s in score_blocks(test_feats, store, weights, layout, normalize,
                                                 per_checkpoint=per_checkpoint, tf32=tf32)]
    return torch.cat(blocks, dim=-1)


def self_influence(store: FeatureStore, weights: torch.Tensor, per_checkpoint: bool = False) -> torch.Tensor:
    """s(z) = sum_c eta_c ||F_c(z)||^2 from stored squared norms: (n,), or (C, n) terms."""
    terms = weights.to(torch.float64).unsqueeze(1) * store.sq_norms
    return terms if per_checkpoint else terms.sum(0)
