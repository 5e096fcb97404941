"""The exact hook path writes each block's gradients in place in the rows (handlers' grad_into):
repeated uses accumulate, a tied Embedding adds after its dense Linear use, a handler that only
overrides grad_matrix keeps working, mixed precisions go through a product; and squared norms of
rows wider than one chunk (layout._sq) against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tracin_engine.gradients.handlers import register_handler
from tracin_engine.gradients.handlers.base import bmm_into
from tracin_engine.gradients.handlers.linear import LinearHandler
from tracin_engine.gradients.hooks import HookFeaturizer
from tracin_engine.gradients.per_example import GradientComputer
from tracin_engine.store.layout import Layout, Segment


class Reused(nn.Module):
    """One Linear called twice on sequences; one Embedding called twice, tied to the output head
    which comes first in module order (so the head's dense write precedes the embedding's adds)."""

    def __init__(self, vocab: int = 9, dim: int = 5):
        super().__init__()
        self.head = nn.Linear(dim, vocab, bias=False)
        self.emb = nn.Embedding(vocab, dim)
        self.head.weight = self.emb.weight
        self.fc = nn.Linear(dim, dim)

    def forward(self, ids):
        x = self.emb(ids) + self.emb(ids.flip(1))
        x = torch.tanh(self.fc(torch.tanh(self.fc(x))))
        return self.head(x).mean(1)


class SlowLinear(nn.Linear):
    """A Linear whose handler overrides only grad_matrix: grad_into must use it (the default path)."""


class SlowLinearHandler(LinearHandler):
    calls = 0

    def grad_matrix(self, ctx, g):
        SlowLinearHandler.calls += 1
        return torch.einsum("btr,btc->brc", self.rows(ctx, g), self.cols(ctx, g))


class WithSlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = SlowLinear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


def _check(model, x, y):
    gc = GradientComputer(model, F.cross_entropy, device="cpu")
    state = gc.prepare(model.state_dict())
    hf = HookFeaturizer(gc)
    for _ in range(2):                                   # first batch (layout, sum check), then a later one
        rows = hf(state, x, y)
        assert torch.allclose(hf.expand(rows), gc.reference(state, x, y), rtol=1e-9, atol=1e-12)
    return hf


def test_reused_and_tied_layers_accumulate_in_place():
    torch.manual_seed(0)
    model = Reused().double()
    ids = torch.randint(0, 9, (4, 6))
    ids[0, :3] = 2                                       # repeated tokens in one example
    hf = _check(model, ids, torch.randint(0, 9, (4,)))
    tied = [[type(u.handler.module) for u in b.uses] for b in hf.blocks if len(b.uses) > 1]
    assert tied == [[nn.Linear, nn.Embedding]]           # the dense use first in module order


@pytest.mark.parametrize("store_dtype", [None, torch.float32], ids=["in_place", "reused_buffer"])
def test_featurize_writes_rows_in_place_or_into_one_reused_buffer(store_dtype, tmp_path, monkeypatch):
    """On the CPU featurization writes each micro-batch's exact rows straight into the store when it
    holds the rows' dtype (FeatureStore.destination), else into the first micro-batch's rows reused
    (no fresh memory per batch); either way each stored row equals the float64 per-example loop's
    (stale numbers of the previous batch anywhere, e.g. in the tied embedding's untouched rows, fail)."""
    import tracin_engine as te
    from tracin_engine.gradients import hooks as hooks_mod

    torch.manual_seed(1)
    model = Reused().double()
    ids, y = torch.randint(0, 9, (11, 6)), torch.randint(0, 9, (11,))
    ids[5:] = torch.randint(0, 3, (6, 6))                # later batches use fewer tokens than earlier ones
    made = []
    real = hooks_mod.empty_output

    def counting(shape, dtype, device):
        made.append(shape)
        return real(shape, dtype, device)

    monkeypatch.setattr(hooks_mod, "empty_output", counting)
    later = {k: v * 1.5 for k, v in model.state_dict().items()}
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict(), later], [1.0, 0.5]),
                       loss_fn=F.cross_entropy)
    idx = tracin.index((ids, y), progress=False, batch_size=4, dtype=store_dtype)
    gc = tracin.featurizer.grads
    assert tracin.featurizer.mode == "hooks"
    # 2 checkpoints x 3 batches (4, 4, 3); before them only the path's 2-example trial
    trial = [(1, 2, tracin.dim)]
    assert made in ((trial, []) if store_dtype is None else (trial + [(1, 4, tracin.dim)], [(1, 4, tracin.dim)]))
    rtol = 1e-9 if store_dtype is None else 1e-6
    for c in range(2):
        want = gc.reference(tracin.state(c), ids, y)
        got = tracin.featurizer.hooks.expand(idx.features(c).double())
        assert torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))
    # on disk too; a run interrupted after its first batch resumes without writing into rows already done
    from tracin_engine.store.feature_store import FeatureStore

    real_write, real_dest, seen = FeatureStore.write, FeatureStore.destination, []

    def interrupt_second(self, c, start, *args, **kw):
        if (c, start) != (0, 0):
            raise KeyboardInterrupt
        real_write(self, c, start, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(FeatureStore, "write", interrupt_second)
        with pytest.raises(KeyboardInterrupt):
            tracin.index((ids, y), store=tmp_path / "ix", progress=False, batch_size=4, dtype=store_dtype)
    m = FeatureStore.open(tmp_path / "ix")
    before, done = m.features(0)[:4].clone(), m.done_mask.clone()
    del m
    assert done[0, :4].all() and not done[0, 4:].any() and not done[1].any()
    monkeypatch.setattr(FeatureStore, "destination",
                        lambda self, c, s, e: seen.append((c, s)) or real_dest(self, c, s, e))
    again = tracin.index((ids, y), store=tmp_path / "ix", progress=False, batch_size=4, dtype=store_dtype)
    assert torch.equal(again.features(0)[:4], before) and (0, 0) not in seen and len(seen) == 5
    for c in range(2):
        want = gc.reference(tracin.state(c), ids, y)
        got = tracin.featurizer.hooks.expand(again.features(c).double())
        assert torch.allclose(got, want, rtol=rtol, atol=rtol * float(want.abs().max()))


def test_handler_overriding_only_grad_matrix_is_used():
    torch.manual_seed(0)
    register_handler(SlowLinear, SlowLinearHandler)
    SlowLinearHandler.calls = 0
    _check(WithSlow().double(), torch.randn(3, 5, 4, dtype=torch.float64), torch.randint(0, 3, (3,)))
    assert SlowLinearHandler.calls >= 2


@pytest.mark.parametrize("accumulate", [False, True])
def test_bmm_into_a_strided_view_and_across_dtypes(accumulate):
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 7, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):         # float32 rows from float64 factors: via a product
        rows = torch.randn(3, 40, dtype=dtype)
        before = rows.clone()
        out = rows[:, 10:30].unflatten(1, (4, 5))
        bmm_into(out, x.to(dtype) if dtype == torch.float64 else x, y.to(dtype) if dtype == torch.float64 else y,
                 accumulate)
        want = (x @ y).to(dtype) + (before[:, 10:30].reshape(3, 4, 5) if accumulate else 0)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        assert torch.allclose(rows[:, 10:30].reshape(3, 4, 5), want, rtol=tol, atol=tol)
        assert torch.equal(rows[:, :10], before[:, :10]) and torch.equal(rows[:, 30:], before[:, 30:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sq_norms_of_rows_wider_than_a_chunk(dtype):
    torch.manual_seed(0)
    k = 2**17 + 2**16 + 11                               # many chunks and a remainder
    f = torch.randn(3, k + 30).to(dtype)
    lay = Layout([Segment("dense", 0, k), Segment("outer", k, 10, 20)])
    f64 = f.double()
    want = (f64[:, :k] ** 2).sum(1) + (f64[:, k:k + 10] ** 2).sum(1) * (f64[:, k + 10:] ** 2).sum(1)
    got = lay.sq_norms(f)
    assert got.dtype == torch.float64
    # float32 accumulation within each chunk of 4096 (float64 for float64 rows), then float64
    assert torch.allclose(got, want, rtol=1e-12 if dtype == torch.float64 else 1e-6)


def test_empty_output_large_cpu_tensor_is_usable_and_small_ones_are_plain():
    from tracin_engine.buffers import MIN_BYTES, empty_output
    n = MIN_BYTES // 4 + 1000
    big = empty_output((2, n // 2), torch.float32, torch.device("cpu"))
    assert big.shape == (2, n // 2) and big.dtype == torch.float32 and big.is_contiguous()
    big.fill_(3.0)
    row = big[1]
    del big                                              # a view keeps the mapping alive
    assert float(row[-1]) == 3.0 and float(row.sum()) == 3.0 * (n // 2)
    small = empty_output((3, 4), torch.float64, torch.device("cpu"))
    assert small.shape == (3, 4) and small.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("large", [True, False])
def test_zeros_output_is_zero_large_or_small(dtype, large):
    """zeros_output (an in-memory index): zeros, also where it is a kernel-zeroed mapping (large)."""
    from tracin_engine.buffers import MIN_BYTES, zeros_output
    import tracin_engine.buffers as buffers

    n = (MIN_BYTES // 2 + 4096) if large else 12
    z = zeros_output((2, n), dtype, torch.device("cpu"))
    assert z.shape == (2, n) and z.dtype == dtype and z.is_contiguous()
    assert not z.any() and (buffers._mapped((2, n), dtype, torch.device("cpu")) is not None) == (
        large and hasattr(buffers.mmap, "MADV_HUGEPAGE"))
    z[1, -1] = 2
    assert float(z.sum()) == 2.0


class Convs(nn.Module):
    """Conv2d with stride, dilation and bias, a Conv2d used twice (accumulating), and a Conv1d."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, stride=2, padding=2, dilation=2)
        self.b = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.c = nn.Conv1d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.b(torch.tanh(self.a(x))))))     # (B, 3, 9, 9)
        h = torch.tanh(self.c(h.flatten(2)))                                    # (B, 4, 81)
        return self.fc(h.mean(2))


@pytest.mark.parametrize("grouped", [True, False])
def test_conv_gradients_by_grouped_convolution_and_by_unfolding(monkeypatch, grouped):
    """Both ways of writing a convolution's per-example weight gradients (chosen by the number of
    output positions) against the float64 loop: forced here, never left to the sizes."""
    from tracin_engine.gradients.handlers import conv

    monkeypatch.setattr(conv, "GROUPED_MIN_POSITIONS", 1 if grouped else 10**9)
    torch.manual_seed(0)
    _check(Convs().double(), torch.randn(3, 2, 17, 17, dtype=torch.float64), torch.tensor([0, 2, 1]))
