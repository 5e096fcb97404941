"""The device contract, residency, TF32 switch, projection generator and NCCL checks, on the CPU.

No GPU here, so devices are exercised by construction: every public result is asked for on the meta
device (out_device="meta"), which proves it passes through the one output conversion (on CUDA that
conversion is what brings it to the CPU), and by default it must come back on the CPU. Code that
mixes devices fails on meta exactly as it fails on CUDA ("expected all tensors on the same device").
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te
from tracin_engine import devices
from tracin_engine.gradients.per_example import GradientComputer
from tracin_engine.gradients.projection import GENERATOR, RandomProjection, projection_entries
from tracin_engine.methods.distributed import check_rank_device, local_device
from tracin_engine.methods.ideal import TracInIdealRecorder
from tracin_engine.store.residency import DeviceFeatures
from tracin_engine.store.scoring import block_row_bytes, default_block_size, full_scores

META = torch.device("meta")


def _on(x, device_type):
    return x.device.type == device_type


def test_resolve_device_and_outputs():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(None, nn.Linear(2, 2)).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices.resolve_device(None, nn.Linear(2, 2, device="meta")).type in ("cpu", "cuda")  # meta is no home
    t = torch.ones(3)
    assert devices.to_output(t) is t  # no copy on the CPU
    assert _on(devices.to_output(t, "meta"), "meta")


def test_every_public_result_is_on_the_cpu_or_out_device(cnn_index, small_digits):
    idx = cnn_index
    test = (small_digits.test[0][:3], small_digits.test[1][:3])
    feats = idx.test_features(test)
    assert _on(feats, "cpu") and _on(idx.test_features(test, out_device="meta"), "meta")
    assert _on(idx.features(0), "cpu") and _on(idx.features(0, out_device="meta"), "meta")
    for name, call in {
        "influence": lambda **o: idx.influence(features=feats, **o),
        "influence_per_checkpoint": lambda **o: idx.influence_per_checkpoint(features=feats, **o),
        "similarity": lambda **o: idx.similarity(features=feats, **o),
        "self_influence": lambda **o: idx.self_influence(**o),
        "self_influence_per_checkpoint": lambda **o: idx.self_influence_per_checkpoint(**o),
    }.items():
        assert _on(call(), "cpu"), name
        assert _on(call(out_device="meta"), "meta"), name
    for name, call in {"top_k": lambda **o: idx.top_k(features=feats, k=4, **o),
                       "renormalized_top_k": lambda **o: idx.renormalized_top_k(features=feats, k=4, **o)}.items():
        for part in (call().proponents, call().opponents):
            assert _on(part.indices, "cpu") and _on(part.scores, "cpu"), name
        meta = call(out_device="meta")
        assert _on(meta.proponents.indices, "meta") and _on(meta.opponents.scores, "meta"), name
    out = idx.outliers()
    assert all(_on(t, "cpu") for t in (out.indices, out.scores, out.per_checkpoint))
    cl = idx.cluster(3)
    assert all(_on(t, "cpu") for t in (cl.labels, cl.sizes, cl.centers, cl.centrality, *cl.representatives))
    assert _on(idx.tracin.predictions(test), "cpu")


def test_source_and_ensemble_results_follow_the_contract(mlp_run, small_digits):
    model, ckpts = mlp_run
    train = (small_digits.train[0][:40].flatten(1), small_digits.train[1][:40])
    test = (small_digits.test[0][:3].flatten(1), small_digits.test[1][:3])
    src = te.TracIn(model, ckpts, loss_fn=F.cross_entropy).index(train, method="source", progress=False)
    assert _on(src.influence(test), "cpu") and _on(src.influence(test, out_device="meta"), "meta")
    assert _on(src.self_influence(), "cpu") and _on(src.self_influence(out_device="meta"), "meta")
    assert _on(src.test_features(test), "cpu") and _on(src.top_k(test, k=3).proponents.indices, "cpu")
    torch.manual_seed(0)
    drop = nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 10))
    ck = te.Checkpoints.from_state_dicts([drop.state_dict()], [0.1])
    ens = te.dropout_ensemble(te.TracIn(drop, ck, loss_fn=F.cross_entropy), train, n_members=2, progress=False)
    assert _on(ens.influence(test), "cpu") and _on(ens.influence(test, out_device="meta"), "meta")
    assert _on(ens.self_influence(), "cpu") and _on(ens.member_influence(test), "cpu")
    assert _on(ens.top_k(test, k=3).proponents.scores, "cpu")
    assert _on(ens.top_k(test, k=3, out_device="meta").proponents.scores, "meta")


class _WithBuffer(nn.Module):
    """A model whose forward reads a NON-persistent buffer (absent from its state dict)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("shift", torch.tensor([0.5, -1.0, 2.0, 0.25]), persistent=False)

    def forward(self, x):
        return self.fc(x - self.shift)


def test_non_persistent_buffers_move_with_the_checkpoint_state():
    model = _WithBuffer()
    assert "shift" not in model.state_dict()
    gc = GradientComputer(model, F.cross_entropy, device="meta")
    state = gc.prepare(model.state_dict())
    assert "shift" in state and all(_on(v, "meta") for v in state.values())  # nothing left on the CPU
    # and on the CPU the buffer is used: features equal the per-example loop
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [0.5])
    for mode in ("hooks", "vmap"):
        tracin = te.TracIn(model, ck, loss_fn=F.cross_entropy, per_example=mode, device="cpu")
        fast = tracin.index((x, y), progress=False).influence((x, y))
        g = GradientComputer(model, F.cross_entropy, device="cpu")
        G = g.reference(g.prepare(model.state_dict()), x, y).double()
        assert torch.allclose(fast.double(), 0.5 * G @ G.T, rtol=1e-5, atol=1e-8), mode


def test_ideal_recorder_keeps_its_accumulators_on_the_models_device():
    """On the meta device: any CPU tensor mixed into the computation would raise, as on CUDA."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to("meta")
    xt, yt = torch.randn(3, 5), torch.randint(0, 3, (3,))  # on the CPU: the recorder moves them
    rec = TracInIdealRecorder(model, F.cross_entropy, (xt, yt), n_train=10)
    with rec.step(torch.tensor([1, 4]), torch.randn(2, 5), torch.randint(0, 3, (2,)), lr=0.1):
        pass
    ideal, first = rec.result(out_device="meta")
    assert rec.device.type == "meta" and _on(ideal, "meta") and _on(first, "meta") and ideal.shape == (3, 10)


def test_tf32_switch_sets_and_restores_the_flags():
    before = devices.tf32_enabled()
    with devices.tf32_mode(True):
        assert devices.tf32_enabled()
        with devices.tf32_mode(False):
            assert not devices.tf32_enabled()
        assert devices.tf32_enabled()
    assert devices.tf32_enabled() == before
    with pytest.raises(ValueError):
        with devices.tf32_mode(True):
            raise ValueError("inside")
    assert devices.tf32_enabled() == before
    # tolerances derived from the unit roundoff (docs/gpu.md)
    assert devices.agreement_tolerance(False, 1000) == pytest.approx(64 * 1000 ** 0.5 * 2 ** -24)
    assert devices.agreement_tolerance(True, 1000) > 100 * devices.agreement_tolerance(False, 1000)


def test_tf32_auto_allows_it_for_projected_indexes_only(monkeypatch):
    """tf32="auto" (the default): True with proj_dim (projection error ~1/sqrt(proj_dim) >> TF32's 1e-3),
    False for exact gradients and for a projected TracIn's exact sibling (rerank); explicit values win;
    the resolved flag is what featurization runs under."""
    from tracin_engine.methods import tracin as tracin_mod

    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    ck = te.Checkpoints.from_state_dicts([lin.state_dict()], [1.0])
    exact, proj = te.TracIn(lin, ck), te.TracIn(lin, ck, proj_dim=4)
    assert exact.tf32 is False and proj.tf32 is True and proj.exact().tf32 is False
    assert te.TracIn(lin, ck, proj_dim=4, tf32=False).tf32 is False
    assert te.TracIn(lin, ck, tf32=True).tf32 is True
    assert te.TracIn(lin, ck, proj_dim=4, tf32=True).exact().tf32 is True   # an explicit choice carries over
    with pytest.raises(te.TracInError, match="tf32 must be 'auto', True or False"):
        te.TracIn(lin, ck, tf32="yes")
    seen = []
    real = tracin_mod.tf32_mode

    def spy(enabled):
        seen.append(enabled)
        return real(enabled)

    monkeypatch.setattr(tracin_mod, "tf32_mode", spy)
    data = (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
    te.TracIn(lin, ck, proj_dim=4, loss_fn=nn.functional.cross_entropy).index(data, progress=False)
    assert seen and set(seen) == {True}
    seen.clear()
    te.TracIn(lin, ck, loss_fn=nn.functional.cross_entropy).index(data, progress=False)
    assert seen and set(seen) == {False}


# -- the projection generator, checked against an independent pure-Python implementation -----------
_M = 0xFFFFFFFF


def _mix(x: int) -> int:
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M
    return x ^ (x >> 16)


def _entry(seed: int, i: int, j: int, kind: str) -> float:
    key = _mix(_mix(seed & _M) ^ _mix((seed >> 32) & _M))
    h = _mix(_mix(i ^ key) ^ _mix((j + 0x9E3779B9) & _M))
    if kind == "rademacher":
        return 1.0 if h >> 31 else -1.0
    return statistics.NormalDist().inv_cdf(((h >> 12) + 0.5) / 2**20)  # before the unit-variance scale


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_projection_entries_follow_the_documented_generator(seed):
    rows = [0, 1, 4095, 4096, 123457]
    cols = [0, 1, 63, 1000]
    g = torch.cat([projection_entries(seed, r, 1, 1001, "gaussian", torch.device("cpu"), torch.float64)
                   for r in rows])[:, cols]
    r = torch.cat([projection_entries(seed, r, 1, 1001, "rademacher", torch.device("cpu"), torch.float32)
                   for r in rows])[:, cols]
    ref_g = torch.tensor([[_entry(seed, i, j, "gaussian") for j in cols] for i in rows], dtype=torch.float64)
    ref_r = torch.tensor([[_entry(seed, i, j, "rademacher") for j in cols] for i in rows])
    assert torch.equal(r, ref_r)
    scale = g / ref_g  # one constant (the unit-variance factor, ~1), up to the float32 rounding of the table
    assert torch.allclose(scale, scale.flatten()[0].expand_as(scale), rtol=2**-23)
    assert abs(float(scale.flatten()[0]) - 1) < 1e-3
    assert GENERATOR == RandomProjection(10, 4).generator


def test_projection_is_drawn_once_when_cached_and_on_the_device_otherwise():
    G = torch.randn(3, 900, dtype=torch.float64)
    cached = RandomProjection(900, 16, seed=2, block_rows=256)
    a, b = cached(G), cached(G)
    assert torch.equal(a, b) and cached.generated_blocks == 4  # 4 blocks, drawn once
    fresh = RandomProjection(900, 16, seed=2, block_rows=256, cache_bytes=0)
    assert torch.equal(fresh(G), a) and torch.equal(fresh(G), a) and fresh.generated_blocks == 8
    meta = fresh.block(0, META, torch.float32)  # drawn where asked: no CPU detour
    assert _on(meta, "meta") and meta.shape == (256, 16)


# -- residency -------------------------------------------------------------------------------------------
def test_resident_and_streamed_features_score_like_the_store(cnn_index, small_digits, tmp_path):
    idx = cnn_index
    test = (small_digits.test[0][:4], small_digits.test[1][:4])
    t = idx.tracin.features(test)
    saved = te.FeatureStore.load(idx.save(tmp_path / "ix"))  # memory-mapped
    want = full_scores(t, idx.store, idx.learning_rates, idx.layout)
    for store in (idx.store, saved):
        for mode in ("direct", "resident", "stream"):
            feats = DeviceFeatures(store, "cpu", mode=mode)
            assert feats.mode == mode
            got = full_scores(t, feats, idx.learning_rates, idx.layout)
            assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), mode
            if mode == "stream":  # every row crossed once per checkpoint
                assert feats.copied_bytes == store.n_checkpoints * store.n * store.dim * 4
    assert DeviceFeatures(idx.store, "cpu").mode == "direct"
    assert idx.device_features() is idx.device_features()  # made once per index and device


def test_block_sizes_bound_the_bytes_of_a_block():
    per = block_row_bytes(1, 4, False, dim=4096, itemsize=2)
    assert per == 4 * 2 + 4096 * (2 + 4) + 8
    b = default_block_size(1, 4, False, budget_bytes=2**24, dim=4096, itemsize=2)
    assert b * per <= 2**24 < (b + 1) * per
    assert default_block_size(1, 4, False, budget_bytes=10, dim=4096) == 1


def test_nccl_ranks_must_use_their_local_gpu():
    check_rank_device(torch.device("cpu"), "gloo", 3)  # gloo: anything goes
    check_rank_device(torch.device("cuda", 1), "nccl", 1)
    with pytest.raises(te.TracInError, match="local_device"):
        check_rank_device(torch.device("cuda", 0), "nccl", 1)
    if not torch.cuda.is_available():
        assert local_device() == torch.device("cpu")
