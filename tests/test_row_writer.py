"""RowWriter (store/writer.py): the pipelined writes CUDA uses, forced on the CPU, give the same store as
immediate writes, keep every row computed before an interruption, and name non-finite examples."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.data import DataSource
from tracin_engine.gradients import featurize as featurize_mod
from tracin_engine.store import writer as writer_mod
from tracin_engine.store.feature_store import FeatureStore
from tracin_engine.store.writer import RowWriter

from test_store import Counting, _tracin, _train


@pytest.fixture
def pipelined(monkeypatch):
    """featurize() with the CUDA bookkeeping (a micro-batch in flight) on the CPU."""
    monkeypatch.setattr(featurize_mod, "RowWriter", functools.partial(RowWriter, pipelined=True))


def _same_store(a: FeatureStore, b: FeatureStore) -> None:
    for c in range(a.n_checkpoints):
        assert torch.equal(a.features(c), b.features(c))
    for name in ("sq_norms", "out_sq_norms", "losses"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.done_mask, b.done_mask)


def test_pipelined_index_equals_immediate(cnn_run, small_digits, tmp_path, monkeypatch):
    train = _train(small_digits, 95)
    want = _tracin(cnn_run).index(train, store=tmp_path / "a", progress=False, batch_size=20)
    monkeypatch.setattr(featurize_mod, "RowWriter", functools.partial(RowWriter, pipelined=True))
    got = _tracin(cnn_run).index(train, store=tmp_path / "b", progress=False, batch_size=20)
    assert got.store.complete
    _same_store(got.store, want.store)


def test_interrupt_writes_the_micro_batch_in_flight(cnn_run, small_digits, tmp_path, pipelined):
    train = _train(small_digits, 60)
    t = _tracin(cnn_run)
    t.featurizer = Counting(t.featurizer, fail_at=9)    # Ctrl-C during the 9th batch: checkpoint 1, rows 20-29
    with pytest.raises(KeyboardInterrupt):
        t.index(train, store=tmp_path / "ix", progress=False, batch_size=10)
    done = FeatureStore.load(tmp_path / "ix").done_mask
    # rows 10-19 of checkpoint 1 were still in flight when the interrupt came: flushed, not lost
    assert done[0].all() and done[1, :20].all() and not done[1, 20:].any() and not done[2:].any()


def test_non_finite_rows_are_named_after_earlier_rows_are_written(pipelined):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    X, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    X[13, 0] = float("nan")
    X[17, 2] = float("inf")
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    store = FeatureStore(len(X), len(ckpts), tracin.dim, torch.float32)
    with pytest.raises(te.TracInError, match=r"example indices \[13, 17\]"):
        featurize_mod.featurize(tracin.featurizer, ckpts, DataSource((X, y)), store, batch_size=10, progress=False)
    assert store.done_mask[0, :10].all() and not store.done_mask[0, 10:].any()


def test_large_rows_are_written_at_once_in_order(monkeypatch):
    store = FeatureStore(6, 1, 4, torch.float32)
    order = []
    real = FeatureStore.write
    monkeypatch.setattr(FeatureStore, "write", lambda s, c, start, *a, **k: (order.append(start),
                                                                             real(s, c, start, *a, **k)))
    monkeypatch.setattr(writer_mod, "PIPELINE_MAX_BYTES", 3 * 4 * 4)   # up to 3 rows of 4 float32 in flight
    w = RowWriter(store, torch.device("cpu"), pipelined=True)
    rows = torch.arange(24, dtype=torch.float32).view(6, 4)
    sq = rows.double().pow(2).sum(1)
    w.put(0, 0, rows[:2], sq[:2], "c0")       # pipelined: pending
    assert order == []
    w.put(0, 2, rows[2:6], sq[2:6], "c0")     # 4 rows: too large, written at once after the pending ones
    assert order == [0, 2] and store.complete
    assert torch.equal(store.features(0), rows) and torch.equal(store.sq_norms[0], sq)


@pytest.mark.parametrize("path", ["exact", "factored"])
def test_squared_norms_screen_every_column_for_non_finite_entries(path):
    """The writer's finiteness check reads the layout's squared norms instead of another pass over the
    rows: a NaN or an inf in ANY column (dense, outer-product and low-rank segments: the ViT case has
    all three) must make that row's norm non-finite, also next to zeros (inf * 0)."""
    from models import HANDLER_CASES

    from tracin_engine.gradients.factored import FactoredProjection
    from tracin_engine.gradients.hooks import HookFeaturizer
    from tracin_engine.gradients.per_example import GradientComputer

    model, x, y, loss = HANDLER_CASES["vit"]()
    gc = GradientComputer(model.float(), loss, device="cpu")
    state = gc.prepare(model.state_dict())
    f = HookFeaturizer(gc) if path == "exact" else FactoredProjection(gc, 512, seed=3)
    row = f(state, x.float(), y)[0]
    kinds = {s.kind for s in f.layout.segments}
    assert kinds == ({"dense", "outer", "lowrank"} if path == "exact" else {"dense", "outer"})
    for bad in (float("nan"), float("inf"), -float("inf")):
        for base in (row, torch.zeros_like(row)):
            for lo in range(0, row.numel(), 512):
                cols = torch.arange(lo, min(lo + 512, row.numel()))
                rows = base.repeat(len(cols), 1)
                rows[torch.arange(len(cols)), cols] = bad
                sq = f.layout.sq_norms(rows)
                assert not torch.isfinite(sq).any()
                assert writer_mod.non_finite_rows(rows, sq) == list(range(len(cols)))
