"""On-disk index: half-precision features, metadata checked on reopen, resume after an interruption,
out-of-memory back-off, progress bars, blocked top-k."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.store.topk import reference_top_k


class Counting:
    """Wraps a Featurizer: counts the examples it featurizes; raises `fail` on call number `fail_at`
    (KeyboardInterrupt = Ctrl-C) or for batches larger than `max_batch` (a fake out-of-memory)."""

    def __init__(self, inner, fail_at: int | None = None, max_batch: int | None = None):
        self.inner, self.fail_at, self.max_batch = inner, fail_at, max_batch
        self.calls, self.examples, self.sizes = 0, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def rows(self, state, x, y, target="loss", rows_out=None):  # what featurize() calls for every micro-batch
        self.calls += 1
        self.sizes.append(x.shape[0])
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError("fake: CUDA out of memory")
        self.examples += x.shape[0]
        return self.inner.rows(state, x, y, target, rows_out=rows_out)


def _tracin(cnn_run, **kw):
    model, ckpts = cnn_run
    kw = {"proj_dim": 128, "projection": "factored", **kw}
    return te.TracIn(model, ckpts, loss_fn=F.cross_entropy, **kw)


def _train(small_digits, n=100):
    return small_digits.train[0][:n], small_digits.train[1][:n]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_disk_index_half_precision(cnn_run, small_digits, tmp_path, dtype):
    train, test = _train(small_digits), small_digits.test
    mem = _tracin(cnn_run).index(train, progress=False, batch_size=32)
    disk = _tracin(cnn_run).index(train, store=tmp_path / "ix", progress=False, batch_size=32, dtype=dtype)
    assert disk.store.dtype == dtype and disk.features(0).dtype == dtype
    meta = json.loads((tmp_path / "ix" / "metadata.json").read_text())
    for key in ("model", "checkpoints", "learning_rates", "proj_dim", "seed", "n", "dim", "dtype", "projection"):
        assert key in meta
    assert meta["n"] == 100 and meta["proj_dim"] == 128 and meta["projection"] == "factored"
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for c in range(4):
        ref = mem.features(c)
        assert (disk.features(c).float() - ref).abs().max() <= tol * ref.abs().max()
    # norms are accumulated from the float32 features, not the rounded ones
    assert torch.allclose(disk.store.sq_norms, mem.store.sq_norms, rtol=1e-6)
    a, b = disk.influence(test), mem.influence(test)
    assert (a - b).abs().max() <= 2 * tol * b.abs().max()
    # reopened from disk: same scores, and a fresh TracIn of the same settings is accepted
    again = te.GradientIndex.load(tmp_path / "ix", _tracin(cnn_run))
    assert torch.equal(again.influence(test), a)
    assert torch.equal(again.self_influence(), disk.self_influence())
    assert torch.equal(again.outliers().scores, mem.outliers().scores)  # output norms kept in float64 on disk
    # an in-memory copy (on the CPU here; "cuda" on a GPU) answers the same queries
    copy = te.GradientIndex(_tracin(cnn_run), disk.store.resident("cpu"))
    assert copy.store.path is None and torch.equal(copy.influence(test), a)


def test_reopen_with_other_settings_is_a_clear_error(cnn_run, small_digits, tmp_path):
    model, ckpts = cnn_run
    train = _train(small_digits, 40)
    _tracin(cnn_run).index(train, store=tmp_path / "ix", progress=False)
    with pytest.raises(te.TracInError, match="proj_dim: stored 128, now 64"):
        _tracin(cnn_run, proj_dim=64).index(train, store=tmp_path / "ix", progress=False)
    with pytest.raises(te.TracInError, match="proj_dim"):
        te.GradientIndex.load(tmp_path / "ix", _tracin(cnn_run, proj_dim=64))
    other_ckpts = te.Checkpoints.from_state_dicts([ckpts.load(c) for c in range(3)], ckpts.learning_rates[:3].tolist())
    with pytest.raises(te.TracInError, match="checkpoints"):
        te.GradientIndex.load(tmp_path / "ix", te.TracIn(model, other_ckpts, loss_fn=F.cross_entropy,
                                                         proj_dim=128, projection="factored"))
    other_model = te.examples.DigitsCNN(width=4, hidden=24)  # other architecture
    with pytest.raises(te.TracInError, match="model"):
        te.GradientIndex.load(tmp_path / "ix", te.TracIn(other_model, ckpts, loss_fn=F.cross_entropy,
                                                         proj_dim=128, projection="factored"))
    with pytest.raises(te.TracInError, match="no metadata.json"):
        te.GradientIndex.load(tmp_path / "nothing", _tracin(cnn_run))


def test_interrupted_featurization_resumes_without_recomputing(cnn_run, small_digits, tmp_path):
    train = _train(small_digits, 60)  # 60 examples, batches of 10, 4 checkpoints: 24 batches
    full = _tracin(cnn_run).index(train, store=tmp_path / "full", progress=False, batch_size=10)

    first = _tracin(cnn_run)
    first.featurizer = Counting(first.featurizer, fail_at=11)  # Ctrl-C during the 11th batch
    with pytest.raises(KeyboardInterrupt):
        first.index(train, store=tmp_path / "ix", progress=False, batch_size=10)
    assert first.featurizer.examples == 100
    with pytest.raises(te.TracInError, match="incomplete"):
        te.GradientIndex.load(tmp_path / "ix", _tracin(cnn_run))
    done = te.FeatureStore.load(tmp_path / "ix").done_mask
    assert done[0].all() and done[1, :40].all() and not done[1, 40:].any() and not done[2:].any()

    second = _tracin(cnn_run)  # a new session
    second.featurizer = Counting(second.featurizer)
    index = second.index(train, store=tmp_path / "ix", progress=False, batch_size=10)
    assert second.featurizer.examples == 240 - 100  # nothing written before the interrupt is recomputed
    for c in range(4):
        assert torch.equal(index.features(c), full.features(c))
    assert torch.equal(index.store.sq_norms, full.store.sq_norms)
    assert torch.equal(index.store.out_sq_norms, full.store.out_sq_norms)  # recorded, resumed, complete
    assert torch.equal(index.store.losses, full.store.losses) and not index.store.losses.isnan().any()
    # a third run finds everything done and computes nothing
    third = _tracin(cnn_run)
    third.featurizer = Counting(third.featurizer)
    third.index(train, store=tmp_path / "ix", progress=False, batch_size=10)
    assert third.featurizer.calls == 0


def test_out_of_memory_halves_the_batch(cnn_run, small_digits):
    train = _train(small_digits, 50)
    ref = _tracin(cnn_run).index(train, progress=False, batch_size=50)
    t = _tracin(cnn_run)
    t.featurizer = Counting(t.featurizer, max_batch=12)
    index = t.index(train, progress=False, batch_size=50)
    assert t.featurizer.sizes[:3] == [50, 25, 12]  # backs off on the first batch ...
    assert max(t.featurizer.sizes[3:]) <= 12       # ... and stays small
    for c in range(4):
        assert torch.allclose(index.features(c), ref.features(c), rtol=1e-5, atol=1e-6)
    with pytest.raises(te.TracInError, match="batch_size"):
        _tracin(cnn_run).index(train, progress=False, batch_size=0)


def test_progress_bar_over_checkpoints_and_batches(cnn_run, small_digits, capsys):
    train = _train(small_digits, 40)
    _tracin(cnn_run).index(train, progress=False, batch_size=10)
    assert "featurize" not in capsys.readouterr().err
    _tracin(cnn_run).index(train, progress=True, batch_size=10)
    err = capsys.readouterr().err
    assert "featurize (checkpoints x batches)" in err and "16/16" in err


def test_blocked_top_k_equals_full_sort(cnn_run, small_digits):
    index = _tracin(cnn_run).index(_train(small_digits), progress=False)
    test = small_digits.test
    full = reference_top_k(index.influence(test), 10)
    blocked = index.top_k(test, k=10, block_size=7)  # 15 blocks of training rows
    assert torch.equal(blocked.proponents.indices, full.proponents.indices)
    assert torch.equal(blocked.opponents.indices, full.opponents.indices)
    assert torch.allclose(blocked.proponents.scores, full.proponents.scores)


def test_a_store_from_before_output_norms_redoes_only_those_rows(cnn_run, small_digits, tmp_path):
    train = _train(small_digits, 40)
    full = _tracin(cnn_run).index(train, store=tmp_path / "ix", progress=False, batch_size=10)
    expected = full.store.out_sq_norms.clone()
    del full
    # an older store: no out_sq_norms.npy / losses.npy, every row marked done
    (tmp_path / "ix" / "out_sq_norms.npy").unlink()
    (tmp_path / "ix" / "losses.npy").unlink()
    old = te.GradientIndex.load(tmp_path / "ix", _tracin(cnn_run))
    assert old.store.out_sq_norms.isnan().all() and old.store.complete
    with pytest.raises(te.TracInError, match="featurize again into the same store"):
        old.outliers()
    assert len(old.outliers(space="parameters").indices) == 40   # the parameter space still works
    del old
    again = _tracin(cnn_run)
    again.featurizer = Counting(again.featurizer)
    index = again.index(train, store=tmp_path / "ix", progress=False, batch_size=10)  # what the error says
    assert again.featurizer.examples == 40 * 4                    # the rows were redone, once
    assert torch.equal(index.store.out_sq_norms, expected) and len(index.outliers().indices) == 40


def test_damaged_output_arrays_are_reported(cnn_run, small_digits, tmp_path):
    _tracin(cnn_run).index(_train(small_digits, 20), store=tmp_path / "ix", progress=False, batch_size=10)
    np.save(tmp_path / "ix" / "losses.npy", np.zeros((2, 10)))
    with pytest.raises(te.TracInError, match="losses.npy holds .* shape \\(2, 10\\), expected float64 \\(4, 20\\)"):
        te.FeatureStore.load(tmp_path / "ix")


def test_destination_is_a_view_of_rows_not_yet_written_only(tmp_path):
    """FeatureStore.destination: rows a featurizer may fill in place (write() then skips the copy);
    None where a row of the range is done (a resumed run never touches rows already written) or the
    store is read-only."""
    from tracin_engine.store.feature_store import FeatureStore

    fs = FeatureStore(8, 1, 3, torch.float32, path=tmp_path / "s")
    fs.write(0, 0, torch.ones(4, 3))
    assert fs.destination(0, 2, 6) is None
    view = fs.destination(0, 4, 8)
    view.copy_(torch.full((4, 3), 2.0))
    fs.write(0, 4, view)
    assert fs.complete and torch.equal(fs.features(0)[4:], torch.full((4, 3), 2.0))
    assert torch.equal(fs.sq_norms[0], torch.tensor([3.0] * 4 + [12.0] * 4, dtype=torch.float64))
    del fs
    ro = FeatureStore.open(tmp_path / "s")
    assert ro.destination(0, 0, 2) is None and torch.equal(ro.features(0)[4:], torch.full((4, 3), 2.0))
