"""The one out-of-memory policy (tracin_engine/memory.py), with OOM injected on the CPU at every place
that allocates in proportion to a size: featurization (vmap and hook paths), test features, scoring,
SOURCE (its batches and its EK-FAC passes) and clustering. Each recovered result must equal the run
without the injected failure; a failure that cannot shrink further keeps its own type."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine import memory
from tracin_engine.analysis.clustering import UnitRows
from tracin_engine.gradients import per_example
from tracin_engine.gradients.hooks import HookFeaturizer
from tracin_engine.methods import source as source_mod
from tracin_engine.store.layout import Layout


def _oom(msg="CUDA out of memory. Tried to allocate 2.00 GiB (injected)"):
    return torch.OutOfMemoryError(msg)


@pytest.fixture(scope="module")
def data(small_digits):
    (X, y), (Xt, yt) = small_digits.train, small_digits.test
    return (X[:48], y[:48]), (Xt[:6], yt[:6])


def test_is_oom_recognizes_allocator_failures_only():
    assert memory.is_oom(_oom())
    assert memory.is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert memory.is_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert memory.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    wrapped = ValueError("outer")
    wrapped.__cause__ = _oom()
    assert memory.is_oom(wrapped)
    assert not memory.is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"))
    assert not memory.is_oom(te.TracInError("bad labels"))


def test_backoff_halves_for_good_and_reraises_the_original_at_the_minimum():
    seen = []

    def step(b):
        seen.append(b)
        if b > 5:
            raise _oom()
        return b * 10

    size = memory.Backoff(40, "cpu", what="test block")
    assert size.run(step) == 50 and seen == [40, 20, 10, 5] and size.retries == 3
    assert size.run(step) == 50 and seen[-1] == 5  # stays small
    with pytest.raises(torch.OutOfMemoryError) as info:  # never wrapped into another type
        memory.Backoff(4, "cpu", what="test block", advice="try less").run(lambda b: (_ for _ in ()).throw(_oom()))
    assert "injected" in str(info.value)
    if sys.version_info >= (3, 11):  # the advice rides along as a note
        assert any("test block of 1" in n and "try less" in n for n in info.value.__notes__)
    calls = []

    def bad(b):
        calls.append(b)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not retried
        memory.Backoff(8, "cpu").run(bad)
    assert calls == [8]


def test_sizes_come_from_free_memory(monkeypatch):
    assert memory.free_bytes("cpu") > 0
    monkeypatch.setattr(memory, "_cpu_available", lambda: 1000)
    assert memory.budget("cpu") == 500
    assert memory.rows_that_fit(100, "cpu") == 5
    assert memory.rows_that_fit(1000, "cpu") == 1  # at least the minimum
    assert memory.rows_that_fit(1, "cpu", maximum=7) == 7
    assert memory.fits(500, "cpu") and not memory.fits(501, "cpu")


def _index(run, train, **kw):
    model, ckpts = run
    return te.TracIn(model, ckpts, loss_fn=F.cross_entropy, **kw).index(train, progress=False, batch_size=16)


def test_oom_inside_vmap_is_not_wrapped_and_the_batch_halves(cnn_run, data, monkeypatch):
    train, test = data
    want = _index(cnn_run, train, per_example="vmap")
    real_vmap = per_example.vmap
    sizes = []

    def fake_vmap(fn, *args, **kw):
        batched = real_vmap(fn, *args, **kw)

        def call(*xs):
            rows = max(x.shape[0] for x in xs if isinstance(x, torch.Tensor))
            sizes.append(rows)
            if rows > 4:
                raise _oom()
            return batched(*xs)
        return call

    monkeypatch.setattr(per_example, "vmap", fake_vmap)
    got = _index(cnn_run, train, per_example="vmap")
    assert max(sizes) == 16 and min(sizes) <= 4
    for c in range(want.store.n_checkpoints):
        assert torch.allclose(got.features(c), want.features(c), rtol=1e-5, atol=1e-7)
    assert torch.allclose(got.store.sq_norms, want.store.sq_norms, rtol=1e-6)
    # at one example the out-of-memory error itself reaches the user (not a TracInError)
    monkeypatch.setattr(per_example, "vmap", lambda fn, *a, **k: (lambda *xs: (_ for _ in ()).throw(_oom())))
    with pytest.raises(torch.OutOfMemoryError) as info:
        _index(cnn_run, train, per_example="vmap")
    assert not isinstance(info.value, te.TracInError)


def test_rows_are_stored_micro_batch_by_micro_batch_after_a_back_off(cnn_run, data, monkeypatch):
    """Once a batch is split, each micro-batch's rows go to the store before the next is computed: the
    device never holds the whole batch's rows (on CUDA an exact batch of 200 wide rows does not fit
    under a cap that fits 30; tests/test_gpu.py test_forced_out_of_memory_backs_off)."""
    from tracin_engine.store.feature_store import FeatureStore

    train, _ = data
    want = _index(cnn_run, train, per_example="vmap")
    real_vmap, real_write = per_example.vmap, FeatureStore.write
    writes = []

    def fake_vmap(fn, *args, **kw):
        batched = real_vmap(fn, *args, **kw)

        def call(*xs):
            if max(x.shape[0] for x in xs if isinstance(x, torch.Tensor)) > 4:
                raise _oom()
            return batched(*xs)
        return call

    def spy(store, c, start, feats, *a, **kw):
        writes.append((c, start, feats.shape[0]))
        return real_write(store, c, start, feats, *a, **kw)

    monkeypatch.setattr(per_example, "vmap", fake_vmap)
    monkeypatch.setattr(FeatureStore, "write", spy)
    got = _index(cnn_run, train, per_example="vmap")
    assert max(b for _, _, b in writes) == 4                       # micro-batches, not the batch of 16
    assert [s for c, s, _ in writes if c == 0] == list(range(0, len(train[1]), 4))
    assert got.store.complete
    for c in range(want.store.n_checkpoints):
        assert torch.allclose(got.features(c), want.features(c), rtol=1e-5, atol=1e-7)


def test_oom_on_the_hook_path_and_in_test_features(cnn_run, data, monkeypatch):
    train, test = data
    want = _index(cnn_run, train)
    assert want.tracin.featurizer.mode == "hooks"
    want_t = want.test_features((train[0][:40], train[1][:40]))
    real = HookFeaturizer.many_with_outputs

    def flaky(self, states, x, *a, **k):
        if x.shape[0] > 3:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasSgemm`")
        return real(self, states, x, *a, **k)

    monkeypatch.setattr(HookFeaturizer, "many_with_outputs", flaky)
    got = _index(cnn_run, train)
    for c in range(want.store.n_checkpoints):
        assert torch.allclose(got.features(c), want.features(c), rtol=1e-5, atol=1e-7)
    got_t = got.tracin.features((train[0][:40], train[1][:40]), batch_size=16)  # 40 <= 64: the one-pass path fails,
    assert torch.allclose(got_t, want_t, rtol=1e-5, atol=1e-7)                # then checkpoint by checkpoint


def test_oom_while_scoring_halves_the_block(cnn_index, small_digits, monkeypatch):
    test = (small_digits.test[0][:5], small_digits.test[1][:5])
    feats = cnn_index.test_features(test)
    want_s, want_k = cnn_index.influence(features=feats), cnn_index.top_k(features=feats, k=7, block_size=128)
    real = Layout.dots
    blocks = []

    def flaky(self, t, f, matmul=None):
        blocks.append(f.shape[0])
        if f.shape[0] > 40:
            raise _oom()
        return real(self, t, f, matmul)

    monkeypatch.setattr(Layout, "dots", flaky)
    got_k = cnn_index.top_k(features=feats, k=7, block_size=128)
    assert 128 in blocks and max(b for b in blocks[-10:]) <= 40
    assert torch.equal(got_k.proponents.indices, want_k.proponents.indices)
    assert torch.allclose(got_k.opponents.scores, want_k.opponents.scores, rtol=1e-5)
    assert torch.allclose(cnn_index.influence(features=feats), want_s, rtol=1e-5, atol=1e-7)


def test_oom_in_source_batches_and_ekfac(mlp_run, data, monkeypatch):
    model, ckpts = mlp_run
    train, test = data
    flat = (train[0].flatten(1), train[1])
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    want = tracin.index(flat, method="source", progress=False, batch_size=16, steps=[10])
    real_grads, real_fit = source_mod.flat_gradients, source_mod.fit_ekfac
    fit_sizes = []

    def flaky_grads(tr, state, x, *a, **k):
        if x.shape[0] > 5:
            raise _oom()
        return real_grads(tr, state, x, *a, **k)

    def flaky_fit(layers, states, source, curvature, batch_size, seed):
        fit_sizes.append(batch_size)
        if batch_size > 8:
            raise _oom()
        return real_fit(layers, states, source, curvature, batch_size, seed)

    monkeypatch.setattr(source_mod, "flat_gradients", flaky_grads)
    monkeypatch.setattr(source_mod, "fit_ekfac", flaky_fit)
    got = tracin.index(flat, method="source", progress=False, batch_size=16, steps=[10])
    assert fit_sizes[:2] == [16, 8]
    # the same computation in other batch sizes: equal to float32 rounding (the fit's per-batch products run in
    # the model's float32; a wrong halving would differ by far more)
    def close(a, b):
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    assert close(got.features(0), want.features(0))
    assert close(got.self_influence(), want.self_influence())
    test_flat = (test[0].flatten(1), test[1])
    assert close(got.influence(test_flat), want.influence(test_flat))


def test_oom_while_clustering_halves_the_block(cnn_index, monkeypatch):
    want = cnn_index.cluster(5, seed=1, block_size=64, cache_bytes=0)
    real = UnitRows.block

    def flaky(self, start, stop):
        if stop - start > 16 and getattr(self, "_cache", None) is None:
            raise _oom()
        return real(self, start, stop)

    monkeypatch.setattr(UnitRows, "block", flaky)
    got = cnn_index.cluster(5, seed=1, block_size=64, cache_bytes=0)
    assert torch.equal(got.labels, want.labels)
    assert torch.allclose(got.centrality, want.centrality, rtol=1e-5)


def test_auto_batch_size_counts_the_dense_route_of_a_factored_projection(monkeypatch):
    """The factored projection may form dW_b (B, R, C) for blocks with many positions (dense_route):
    the automatic batch size leaves room for two float32 copies of the largest one."""
    from tracin_engine.gradients.featurize import auto_batch_size

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 10))
    tracin = te.TracIn(model, te.Checkpoints.from_state_dicts([model.state_dict()], [0.1]),
                       loss_fn=F.cross_entropy, proj_dim=64)
    tracin.features((torch.randn(2, 3, 8, 8), torch.tensor([0, 1])))   # settles the layout
    fp = tracin.featurizer.projection
    assert fp.dense_numel() == 8 * 27          # the convolution; the Linear sees one position (outer)
    monkeypatch.setattr(memory, "_cpu_available", lambda: 2 * 2**23)  # budget: half of it, 8 MiB
    per_row = 16 * tracin.dim + 2**16
    assert auto_batch_size(tracin.featurizer) == 2**23 // (per_row + 8 * 216) == 122
    monkeypatch.setattr(type(fp), "dense_numel", lambda self: 2**17)
    assert auto_batch_size(tracin.featurizer) == 2**23 // (per_row + 8 * 2**17) == 7
