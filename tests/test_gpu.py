"""CUDA checks (marked gpu: skipped where CUDA is absent). scripts/gpu-check runs them with JSON out.

Tolerances follow the TF32 policy (devices.agreement_tolerance): with TF32 off a CUDA float32 result
agrees with the CPU to 64 sqrt(D) 2^-24 of the largest score (D the row length), with TF32 on to
64 (sqrt(D) 2^-24 + 2^-11). The logic of every agreement helper runs on the CPU in test_gpu_cases.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te
from tracin_engine.devices import agreement_tolerance
from tracin_engine.store.scoring import score_blocks

from gpu_cases import (agreement, counting_syncs, handler_agreement, ideal_agreement, source_agreement, source_models,
                       store_agreement)
from models import HANDLER_CASES
from reference import pearson, rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def data(small_digits):
    (X, y), (Xt, yt) = small_digits.train, small_digits.test
    return (X[:200], y[:200]), (Xt[:16], yt[:16])


def test_cuda_matches_cpu(cnn_run, small_digits):
    model, ckpts = cnn_run
    test = (small_digits.test[0][:16], small_digits.test[1][:16])
    cpu = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu").index(small_digits.train, progress=False)
    gpu = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cuda").index(small_digits.train, progress=False)
    tol = agreement_tolerance(False, gpu.store.dim)
    s = gpu.influence(test)
    assert s.device.type == "cpu"  # the device contract
    assert rel_err(s, cpu.influence(test)) < tol
    assert rel_err(gpu.self_influence(), cpu.self_influence()) < tol
    assert rel_err(gpu.outliers().scores, cpu.outliers().scores) < tol  # output norms recorded on the GPU
    top_c, top_g = cpu.top_k(test, k=10), gpu.top_k(test, k=10)
    assert top_g.proponents.indices.device.type == "cpu"
    for i in range(16):
        assert set(top_c.proponents.indices[i].tolist()) == set(top_g.proponents.indices[i].tolist())


def test_cuda_float64_matches_loop_reference(cnn_run, small_digits):
    from reference import loop_influence

    model, ckpts = cnn_run
    m64 = copy.deepcopy(model).double()
    ck64 = te.Checkpoints.from_state_dicts([{k: v.double() for k, v in ckpts.load(c).items()}
                                            for c in range(len(ckpts))], ckpts.learning_rates.tolist())
    train = (small_digits.train[0][:30].double(), small_digits.train[1][:30])
    test = (small_digits.test[0][:4].double(), small_digits.test[1][:4])
    tracin = te.TracIn(m64, ck64, loss_fn=F.cross_entropy, device="cuda")
    fast = tracin.index(train, progress=False).influence(test)
    ref = loop_influence(tracin, train, test)
    assert rel_err(fast, ref) <= 1e-6
    assert pearson(fast, ref) > 0.999999


@pytest.mark.parametrize("tf32", [False, True], ids=["tf32_off", "tf32_on"])
@pytest.mark.parametrize("projection", [None, "gaussian", "factored"], ids=["exact", "gaussian", "factored"])
@pytest.mark.parametrize("per_example", ["hooks", "vmap"])
def test_cuda_agrees_with_cpu(cnn_run, data, per_example, projection, tf32, record_property):
    model, ckpts = cnn_run
    r = agreement(model, ckpts, *data, per_example, projection, tf32)
    for k, v in r.items():
        record_property(k, v)
    assert r["result_devices"] == ["cpu"]
    assert r["influence_rel_err"] < r["tolerance"]
    assert r["self_influence_rel_err"] < r["tolerance"]
    assert r["outliers_rel_err"] < r["tolerance"]
    assert r["top10_overlap"] >= (0.99 if not tf32 else 0.9)


def test_float16_on_disk_resident_and_streamed_agree(cnn_run, data, tmp_path, record_property):
    model, ckpts = cnn_run
    r = store_agreement(model, ckpts, *data, tmp_path / "ix", device="cuda")
    for k, v in r.items():
        record_property(k, v)
    assert r["auto_mode"] == "resident"
    assert not r["half_products"]                  # on CUDA the float16 rows are upcast on the device
    for mode in ("direct", "resident", "stream"):
        assert r[f"{mode}_rel_err"] < r["tolerance"]
    assert r["resident_store_rel_err"] < r["tolerance"]


def test_source_on_cuda(mlp_run, small_digits, record_property):
    model, ckpts = mlp_run
    train = (small_digits.train[0][:120].flatten(1), small_digits.train[1][:120])
    test = (small_digits.test[0][:8].flatten(1), small_digits.test[1][:8])
    out = {}
    for dev in ("cpu", "cuda"):
        idx = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device=dev).index(train, method="source",
                                                                                  progress=False)
        out[dev] = (idx.influence(test), idx.self_influence())
    err = rel_err(out["cuda"][0], out["cpu"][0])
    record_property("source_rel_err", err)
    assert out["cuda"][0].device.type == "cpu"
    assert err < 1e-4  # float64 curvature and gradients: eigen-decompositions differ in the last bits
    assert rel_err(out["cuda"][1], out["cpu"][1]) < 1e-4


@pytest.mark.parametrize("name", sorted(source_models()))
def test_source_with_every_layer_on_cuda(name, record_property):
    """SOURCE's new paths on CUDA (eighth session): sampled curvature, embeddings, vector blocks, LSTM blocks."""
    r = source_agreement(source_models()[name])
    for k, v in r.items():
        record_property(k, v)
    assert r["curvature"][0] == r["curvature"][1]
    assert r["scores_rel_err"] < 1e-4 and r["self_rel_err"] < 1e-4   # float64; eigenbases differ in the last bits


def test_clustering_on_cuda_reuses_resident_features(cnn_run, data, record_property):
    model, ckpts = cnn_run
    train, _ = data
    cpu = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu").index(train, progress=False)
    gpu = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cuda").index(train, progress=False)
    init = torch.tensor([0, 50, 100, 150])
    a, b = cpu.cluster(4, init=init), gpu.cluster(4, init=init, cache_bytes=0)
    same = float((a.labels == b.labels).double().mean())
    record_property("label_agreement", same)
    assert gpu.device_features().mode in ("resident", "direct") and b.labels.device.type == "cpu"
    assert same >= 0.98


def test_tracin_ideal_on_cuda(small_digits, record_property):
    data = ((small_digits.train[0][:40].flatten(1), small_digits.train[1][:40]),
            (small_digits.test[0][:5].flatten(1), small_digits.test[1][:5]))
    r = ideal_agreement(lambda: nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)), data)
    record_property("ideal_rel_err", r["ideal_rel_err"])
    assert r["ideal_device"] == "cpu" and r["ideal_rel_err"] < 1e-3


def test_model_already_on_cuda_and_non_persistent_buffer(cnn_run, data):
    model, ckpts = cnn_run
    train, test = data
    cpu = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu").index(train, progress=False)
    on_gpu = copy.deepcopy(model).cuda()
    tr = te.TracIn(on_gpu, ckpts, loss_fn=F.cross_entropy)  # device=None: stays with the model
    assert tr.device.type == "cuda"
    assert rel_err(tr.index(train, progress=False).influence(test), cpu.influence(test)) < \
        agreement_tolerance(False, cpu.store.dim)

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.register_buffer("mu", torch.linspace(-1, 1, 64), persistent=False)

        def forward(self, x):
            return self.fc(x.flatten(1) - self.mu)

    torch.manual_seed(0)
    m = Shifted()  # on the CPU; computes on CUDA: the buffer must follow the checkpoint state
    ck = te.Checkpoints.from_state_dicts([m.state_dict()], [0.1])
    a = te.TracIn(m, ck, loss_fn=F.cross_entropy, device="cpu").index(train, progress=False).influence(test)
    b = te.TracIn(m, ck, loss_fn=F.cross_entropy, device="cuda").index(train, progress=False).influence(test)
    assert rel_err(b, a) < agreement_tolerance(False, 650)


def test_no_hidden_syncs_in_scoring(cnn_run, data, record_property):
    model, ckpts = cnn_run
    train, test = data
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cuda")
    idx = tracin.index(train, progress=False)
    feats = idx.device_features()
    t = tracin.features(test, out_device="cuda")
    state = tracin.state(0)
    x, y = train[0][:64].cuda(), train[1][:64].cuda()
    with counting_syncs("cuda") as fz:
        tracin.featurizer.rows(state, x, y)
    with counting_syncs("cuda") as fz_cpu:      # a batch from the CPU: labels checked on the CPU copy
        tracin.featurizer.rows(state, train[0][:64], train[1][:64])
    with counting_syncs("cuda") as sc:
        total = sum(s.sum() for _, s in score_blocks(t, feats, idx.learning_rates, idx.layout))
    with counting_syncs("cuda") as q:
        idx.top_k(features=t, k=10)
    record_property("featurization_batch_syncs", fz["syncs"])
    record_property("featurization_cpu_batch_syncs", fz_cpu["syncs"])
    record_property("scoring_syncs", sc["syncs"])
    record_property("top_k_query_syncs", q["syncs"])
    assert torch.isfinite(total)
    assert sc["syncs"] == 0  # the scoring loop never waits for the GPU
    assert q["syncs"] <= 4   # the query: only the transfers of its results to the CPU
    assert fz_cpu["syncs"] <= 2  # at most the two pageable copies of inputs and labels; no label check on the GPU


def test_forced_out_of_memory_backs_off(small_digits, monkeypatch, record_property):
    """A wide MLP (~0.3M parameters: 1.2 MB per per-example gradient) under a memory cap of about 30
    such gradients: a 200-example vmap micro-batch must fail, back off, and still give the same index."""
    from tracin_engine import memory

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4096), nn.Tanh(), nn.Linear(4096, 10))
    ck = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    train = (small_digits.train[0][:200].flatten(1), small_digits.train[1][:200])
    want = te.TracIn(model, ck, loss_fn=F.cross_entropy, per_example="vmap", device="cpu").index(
        train, progress=False, batch_size=200)
    tracin = te.TracIn(model, ck, loss_fn=F.cross_entropy, per_example="vmap", device="cuda")
    tracin.featurizer.grads.memory_budget = 2**40  # one vmap chunk per micro-batch: it has to fail
    tracin.state(0)  # the checkpoint on the GPU before the cap
    released = []
    real_release = memory.release
    monkeypatch.setattr(memory, "release", lambda d: (released.append(str(d)), real_release(d)))
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    per_example = 4 * tracin.num_params * 4
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_allocated() + 30 * per_example) / total)
    try:
        got = tracin.index(train, progress=False, batch_size=200)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    record_property("oom_retries", len(released))
    assert released, "the cap did not force an out-of-memory error"
    assert rel_err(got.self_influence(), want.self_influence()) < agreement_tolerance(False, tracin.dim)


def test_nccl_single_rank(cnn_run, data, tmp_path, monkeypatch):
    import torch.distributed as dist

    from tracin_engine.methods.distributed import local_device

    monkeypatch.setenv("LOCAL_RANK", "0")
    model, ckpts = cnn_run
    train, _ = data
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rdzv'}", rank=0, world_size=1)
    try:
        tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=128, projection="factored",
                           device=local_device())
        idx = te.index_distributed(tracin, train, store=tmp_path / "ix", progress=False)
        assert idx.store.complete and idx.self_influence().device.type == "cpu"
    finally:
        dist.destroy_process_group()


def test_rerank_on_cuda_returns_the_cpu_exact_scores(cnn_run, data):
    model, ckpts = cnn_run
    train, test = data
    exact_cpu = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu").index(train, progress=False)
    S = exact_cpu.influence(test).double()
    proj = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=64, device="cuda").index(train, progress=False)
    best = proj.top_k(test, k=5, rerank="auto", train_data=train)
    assert best.proponents.indices.device.type == "cpu"
    tol = agreement_tolerance(False, exact_cpu.store.dim)       # exact gradients on CUDA vs on the CPU
    for nb in (best.proponents, best.opponents):
        assert rel_err(nb.scores.double(), S.gather(1, nb.indices)) < tol


@pytest.mark.parametrize("name", list(HANDLER_CASES))
def test_layer_handlers_on_cuda(name, record_property):
    """Every layer-handler case (BatchNorm ResNet, ViT with cls_token, masked encoders, tied causal LMs,
    Embedding/Conv1d/GroupNorm/RMSNorm) on CUDA: float64 rows equal the CPU loop; float32 indexes agree
    with the CPU's within the TF32-off tolerance."""
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    r = handler_agreement(HANDLER_CASES[name], device="cuda")
    for k, v in r.items():
        record_property(k, v)
    assert r["exact_rel_err"] < 1e-9 and r["factored_rel_err"] < 1e-9
    assert r["exact_influence_rel_err"] < r["exact_tolerance"]
    assert r["factored_influence_rel_err"] < r["factored_tolerance"]


@pytest.mark.parametrize("name", ["resnet_bn", "vit", "mixed"])
@pytest.mark.parametrize("gain", [0.0, float("inf")], ids=["by_positions", "dense"])
def test_factored_routes_on_cuda(name, gain, monkeypatch, record_property):
    """Both ways of projecting a block on CUDA (position by position; from the per-example gradient dW_b,
    FactoredProjection.dense_route, which the default takes on a GPU only where it halves the
    multiply-adds) give the explicit projection of the CPU loop's float64 gradients."""
    from tracin_engine.gradients import factored
    from tracin_engine.gradients.factored import FactoredProjection

    monkeypatch.setattr(factored, "DENSE_GAIN", {"cpu": gain, "cuda": gain})
    routes = []
    real = FactoredProjection.dense_route
    monkeypatch.setattr(FactoredProjection, "dense_route",
                        lambda self, *a: routes.append(real(self, *a)) or routes[-1])
    r = handler_agreement(HANDLER_CASES[name], device="cuda")
    record_property("factored_rel_err", r["factored_rel_err"])
    assert r["factored_rel_err"] < 1e-9
    assert r["factored_influence_rel_err"] < r["factored_tolerance"]
    assert any(routes) == (gain > 0)


def test_pipelined_writes_on_cuda_equal_immediate_and_name_non_finite_rows(cnn_run, data, monkeypatch):
    """CUDA featurization writes one micro-batch behind the GPU (store/writer.py): the same store as
    immediate writes, and a NaN input is still named, with the rows before it kept."""
    import functools

    from tracin_engine.gradients import featurize as featurize_mod
    from tracin_engine.store.writer import RowWriter

    model, ckpts = cnn_run
    train, _ = data
    kw = dict(loss_fn=F.cross_entropy, proj_dim=128, device="cuda", tf32=False)   # as on its verified run
    piped = te.TracIn(model, ckpts, **kw).index(train, progress=False, batch_size=32)
    with monkeypatch.context() as m:
        m.setattr(featurize_mod, "RowWriter", functools.partial(RowWriter, pipelined=False))
        plain = te.TracIn(model, ckpts, **kw).index(train, progress=False, batch_size=32)
    for c in range(len(ckpts)):
        assert torch.equal(piped.features(c), plain.features(c))
    assert torch.equal(piped.store.sq_norms, plain.store.sq_norms)
    X = train[0].clone()
    X[70] = float("nan")
    tracin = te.TracIn(model, ckpts, **kw)
    with pytest.raises(te.TracInError, match=r"example indices \[70\]"):
        tracin.index((X, train[1]), progress=False, batch_size=32)
