"""Half-precision scoring on the CPU (scoring.half_matmul) against the float64 computation on the
same stored float16/bfloat16 rows: the error bound of scoring.py's docstring, no overflow where a
naive float16 output overflows, the same top-k where scores are not near-ties."""

from __future__ import annotations

import pytest
import torch

from tracin_engine.store.layout import Layout, Segment
from tracin_engine.store.scoring import (HALF_MAX_TEST_ROWS, HALF_MAX_TEST_ROWS_EMULATED, full_scores,
                                   half_matmul, score_blocks, uses_half_products)
from tracin_engine.store.feature_store import FeatureStore
from tracin_engine.store.topk import streaming_top_k

HALF = [torch.float16, torch.bfloat16]
CPU = torch.device("cpu")
LAYOUTS = {
    "dense": Layout.dense_of(96),
    "mixed": Layout([Segment("dense", 0, 40), Segment("outer", 40, 24, 16), Segment("dense", 80, 8),
                     Segment("outer", 88, 5, 3)]),
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-11 (float16), 2^-8 (bfloat16)."""
    return torch.finfo(dtype).eps / 2


def spread_rows(n: int, dim: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    """(n, dim) float32 Gaussian rows scaled by 10^lo .. 10^hi (a large dynamic range)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(lo, hi, n)[torch.randperm(n, generator=g)]
    return torch.randn(n, dim, generator=g) * scales.unsqueeze(1)


def product_error_bound(x: torch.Tensor, y: torch.Tensor, u: float) -> torch.Tensor:
    """The stated bound on |half_matmul(x, y) - x y^T|: u |x.y| + 3 u^2 |x||y| + 2^-25 |x|, float64."""
    x, y = x.double(), y.double()
    xn, yn = x.norm(dim=1, keepdim=True), y.norm(dim=1)
    return u * (x @ y.T).abs() + 3 * u * u * xn * yn + 2.0**-25 * xn


def score_error_bound(t: torch.Tensor, store: FeatureStore, w: torch.Tensor, layout: Layout, u: float
                      ) -> torch.Tensor:
    """(m, n) bound on the score error: per checkpoint, dots with every product x.y replaced by
    |x.y| + bound(x, y), minus dots with |x.y| (outer terms: (|a|+e_a)(|g|+e_g) - |a||g|), plus
    float32 accumulation (2^-20 of the summed |terms|)."""
    upper = lambda x, y: (x @ y.T).abs() + product_error_bound(x, y, u)  # noqa: E731
    size = lambda x, y: (x @ y.T).abs()  # noqa: E731
    total = 0
    for c in range(store.n_checkpoints):
        tc, f = t[c].double(), store.features(c).double()
        mag = layout.dots(tc, f, size)
        total = total + float(w[c]) * (1.1 * (layout.dots(tc, f, upper) - mag) + 2.0**-20 * mag)
    return total


def reference_scores(t: torch.Tensor, store: FeatureStore, w: torch.Tensor, layout: Layout) -> torch.Tensor:
    """sum_c w_c <t_c, F_c> in float64 from the stored (rounded) rows: (m, n)."""
    return sum(float(w[c]) * layout.dots(t[c].double(), store.features(c).double())
               for c in range(store.n_checkpoints))


def half_store(layout: Layout, dtype: torch.dtype, tmp_path, n: int = 3000, n_ckpt: int = 3) -> FeatureStore:
    """A memory-mapped store of n rows with norms over 5 decades (features up to ~400, fine in float16)."""
    store = FeatureStore(n, n_ckpt, layout.dim, dtype, path=tmp_path / "ix")
    for c in range(n_ckpt):
        store.write(c, 0, spread_rows(n, layout.dim, -3.0, 2.0, seed=10 + c))
    return store


def check_top_k(got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor, k: int) -> int:
    """got (m, k) indices of the k largest computed scores; ref, tol (m, n): exact scores and their
    error bounds. Every pick must be able to reach the exact top k (ref + tol >= the k-th largest
    ref - tol); where the exact top k is clear of the rest by more than the bounds (no near-tie),
    the picks must be exactly that set. Returns the number of such clear rows."""
    clear = 0
    for i in range(len(ref)):
        want = ref[i].topk(k).indices
        rest = torch.ones(ref.shape[1], dtype=torch.bool)
        rest[want] = False
        assert ((ref[i] + tol[i])[got[i]] >= (ref[i] - tol[i]).topk(k).values[-1]).all()
        if (ref[i] - tol[i])[want].min() > (ref[i] + tol[i])[rest].max():
            assert set(got[i].tolist()) == set(want.tolist())
            clear += 1
    return clear


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("k", [64, 4096])
def test_half_matmul_within_the_stated_bound(dtype, k):
    u = unit_roundoff(dtype)
    y = spread_rows(2000, k + 7, -3.0, 2.0, seed=1).to(dtype)[:, 3:3 + k]  # strided, as outer factors
    x = spread_rows(8, k, -4.0, 6.0, seed=2)
    x[0] = 1e5 * y[11].float()  # parallel to a stored row: the largest possible output
    ref = x.double() @ y.double().T
    bound = product_error_bound(x, y, u)
    out = half_matmul(x, y)
    assert out.dtype == torch.float32 and out.shape == (8, 2000)
    assert ((out.double() - ref).abs() <= bound).all()
    # controls: rounding x itself to half (one product, no low part) breaks this bound, and on
    # float16 the unscaled product overflows
    norms = x.norm(dim=1, keepdim=True)
    rounded_x = ((x / norms).to(dtype) @ y.T).double() * norms.double()
    assert ((rounded_x - ref).abs() > bound).any()
    if dtype == torch.float16:
        assert torch.isinf(x.to(dtype) @ y.T).any()


@pytest.mark.parametrize("dtype", HALF)
def test_half_matmul_accumulates_in_float32(dtype):
    """The CPU kernels must accumulate in float32: 4096 ones sum to 4096, where a float16
    accumulator stops at 2048 and a bfloat16 one at 256."""
    y = torch.ones(300, 4096 + 9, dtype=dtype)[:, 4:4 + 4096]
    for m in (1, 2, 7, HALF_MAX_TEST_ROWS):
        assert torch.equal(half_matmul(torch.ones(m, 4096), y), torch.full((m, 300), 4096.0))


def test_half_matmul_stored_row_above_float16_range_falls_back_to_float32():
    y = torch.full((5, 4096), 2000.0, dtype=torch.float16)  # row norm 128,000 > 65504
    y[1:] = 0.5
    x = torch.ones(2, 4096)
    x[1, ::2] = -1
    out = half_matmul(x, y)
    assert torch.isfinite(out).all()
    assert torch.equal(out, x @ y.float().T)


def test_half_products_only_for_half_stores_on_the_cpu_with_few_test_rows(monkeypatch):
    import tracin_engine.store.scoring as scoring

    monkeypatch.setattr(scoring, "_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_fp16"}))
    assert uses_half_products(torch.float16, CPU, 1)
    assert uses_half_products(torch.float16, CPU, HALF_MAX_TEST_ROWS)
    assert not uses_half_products(torch.float16, CPU, HALF_MAX_TEST_ROWS + 1)
    assert not uses_half_products(torch.bfloat16, CPU, HALF_MAX_TEST_ROWS)  # no native bfloat16 dots listed
    assert uses_half_products(torch.bfloat16, CPU, HALF_MAX_TEST_ROWS_EMULATED)
    monkeypatch.setattr(scoring, "_cpu_flags", lambda: frozenset({"avx2"}))
    assert uses_half_products(torch.float16, CPU, HALF_MAX_TEST_ROWS_EMULATED)
    assert not uses_half_products(torch.float16, CPU, HALF_MAX_TEST_ROWS_EMULATED + 1)
    assert not uses_half_products(torch.float32, CPU, 1) and not uses_half_products(torch.float64, CPU, 1)
    assert not uses_half_products(torch.float16, torch.device("cuda"), 1)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_scores_within_the_bound_and_top_k_agrees(dtype, kind, tmp_path):
    layout = LAYOUTS[kind]
    store = half_store(layout, dtype, tmp_path)
    w = torch.tensor([0.1, 0.05, 0.02])
    t = torch.stack([spread_rows(6, layout.dim, -4.0, 6.0, seed=20 + c) for c in range(3)])  # (C, m, dim)
    assert uses_half_products(dtype, CPU, t.shape[1])
    if dtype == torch.float16:  # a naive float16 product of these rows overflows
        assert torch.isinf(t[0].to(dtype) @ store.features(0).T).any()
    ref = reference_scores(t, store, w, layout)
    tol = score_error_bound(t, store, w, layout, unit_roundoff(dtype))
    scores = full_scores(t, store, w, layout)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert ((scores.double() - ref).abs() <= tol).all()

    k = 10
    fast = streaming_top_k(score_blocks(t, store, w, layout, block_size=700), k)
    clear = sum(check_top_k(getattr(fast, side).indices, sign * ref, tol, k)
                for side, sign in (("proponents", 1), ("opponents", -1)))
    assert clear >= len(ref)  # the check has teeth: at least half of the (row, side) pairs have no near-tie
