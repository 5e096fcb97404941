"""Device-agreement checks shared by tests/test_gpu.py (CPU vs CUDA) and tests/test_gpu_cases.py
(the same code run CPU vs CPU, so its logic is tested where there is no GPU). Each returns numbers,
never asserts: the tests and scripts/gpu-check decide against devices.agreement_tolerance.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.devices import agreement_tolerance
from tracin_engine.gradients.factored import FactoredProjection
from tracin_engine.gradients.hooks import HookFeaturizer
from tracin_engine.gradients.per_example import GradientComputer
from tracin_engine.store.residency import DeviceFeatures
from tracin_engine.store.scoring import full_scores, uses_half_products

from reference import rel_err


def topk_overlap(a: te.TopK, b: te.TopK) -> float:
    """Mean fraction of shared proponents per test example."""
    ia, ib = a.proponents.indices, b.proponents.indices
    return sum(len(set(ia[i].tolist()) & set(ib[i].tolist())) for i in range(len(ia))) / ia.numel()


def agreement(model, ckpts, train, test, per_example: str, projection: str | None, tf32: bool,
              device_a: str = "cpu", device_b: str = "cuda", proj_dim: int = 256) -> dict:
    """Build the same index on two devices; relative errors of influence, self-influence and output
    outliers, top-10 overlap, the tolerance for (tf32, row length) and the devices of the results."""
    kw = dict(loss_fn=F.cross_entropy, per_example=per_example, tf32=tf32)
    if projection is not None:
        kw.update(proj_dim=proj_dim, projection=projection)
    a = te.TracIn(model, ckpts, device=device_a, **kw).index(train, progress=False)
    b = te.TracIn(model, ckpts, device=device_b, **kw).index(train, progress=False)
    sa, sb = a.influence(test), b.influence(test)
    return {
        "per_example": per_example, "projection": projection or "exact", "tf32": tf32,
        "mode_b": b.tracin.featurizer.mode, "row_dim": b.store.dim,
        "influence_rel_err": rel_err(sb, sa),
        "self_influence_rel_err": rel_err(b.self_influence(), a.self_influence()),
        "outliers_rel_err": rel_err(b.outliers().scores, a.outliers().scores),
        "top10_overlap": topk_overlap(a.top_k(test, k=10), b.top_k(test, k=10)),
        "tolerance": agreement_tolerance(tf32, b.store.dim),
        "result_devices": sorted({str(sb.device), str(b.self_influence().device),
                                  str(b.top_k(test, k=3).proponents.indices.device)}),
    }


def handler_agreement(build: Callable, device: str = "cuda", proj_dim: int = 256) -> dict:
    """One layer-handler case (tests/models.py HANDLER_CASES: () -> float64 model, inputs, targets, loss)
    computed on `device`:
      exact_rel_err, factored_rel_err   float64 exact rows (expanded) and factored rows on `device`
                                        against the CPU's per-example loop G and its explicit
                                        projection G P (P generated on the CPU from the seed)
      {exact,factored}_influence_rel_err  a float32 copy indexed on `device` vs on the CPU (same
                                        inputs as train and test), with {..}_tolerance from
                                        agreement_tolerance(TF32 off, row length)"""
    model, x, y, loss = build()
    ref = GradientComputer(model, loss, device="cpu")
    G = ref.reference(ref.prepare(model.state_dict()), x, y)                  # (B, P) float64
    gc = GradientComputer(model, loss, device=device)
    state = gc.prepare(model.state_dict())
    hooks = HookFeaturizer(gc)
    fp = FactoredProjection(gc, proj_dim, seed=3)
    out = {"device": device, "row_dim_exact": G.shape[1],
           "exact_rel_err": rel_err(hooks.expand(hooks(state, x, y)).cpu(), G),
           "factored_rel_err": rel_err(fp.expand(fp(state, x, y)).cpu(), G @ fp.matrix().cpu())}
    m32 = copy.deepcopy(model).float()
    data = (x.float() if x.is_floating_point() else x, y)
    ckpts = te.Checkpoints.from_state_dicts([{k: v.detach().clone() for k, v in m32.state_dict().items()}], [1.0])
    for name, kw in (("exact", {}), ("factored", {"proj_dim": proj_dim, "projection": "factored", "tf32": False})):
        a = te.TracIn(m32, ckpts, loss_fn=loss, device="cpu", **kw).index(data, progress=False)
        b = te.TracIn(m32, ckpts, loss_fn=loss, device=device, **kw).index(data, progress=False)
        out[f"{name}_influence_rel_err"] = rel_err(b.influence(data), a.influence(data))
        out[f"{name}_tolerance"] = agreement_tolerance(False, b.store.dim)
    return out


def store_agreement(model, ckpts, train, test, path, device: str = "cuda") -> dict:
    """float16 store on disk (memory-mapped) vs the same rows resident on `device` vs streamed:
    relative errors of the scores against sum_c eta_c <t_c, F_c> in float64 from the same stored rows,
    and the tolerance: float32 products (CUDA; a CPU with many test rows) agree to agreement_tolerance,
    half products (a CPU with few test rows, scoring.half_matmul) to 2 u, u = 2^-11."""
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=128, projection="factored", device=device,
                       tf32=False)   # the IEEE float32 tolerance below
    disk = tracin.index(train, store=path, progress=False, dtype=torch.float16)
    t = tracin.features(test, out_device=device)
    t64, w = t.cpu().double(), disk.learning_rates.double()
    ref = sum(w[c] * disk.layout.dots(t64[c], disk.store.features(c).double()) for c in range(len(t64)))
    half = uses_half_products(disk.store.dtype, t.device, t.shape[1])
    out = {"store_dtype": str(disk.store.dtype), "device": device, "half_products": half,
           # float32 products: agreement_tolerance; half products round each output to float16 (scoring.py)
           "tolerance": 2 * 2.0**-11 if half else agreement_tolerance(False, disk.store.dim)}
    for mode in ("direct", "resident", "stream"):
        feats = DeviceFeatures(disk.store, device, mode=mode)
        out[f"{mode}_rel_err"] = rel_err(full_scores(t, feats, disk.learning_rates, disk.layout), ref)
    out["auto_mode"] = disk.device_features().mode
    out["resident_store_rel_err"] = rel_err(te.GradientIndex(tracin, disk.store.resident(device)).influence(test), ref)
    return out


def ideal_agreement(model_fn: Callable[[], torch.nn.Module], data, device_a="cpu", device_b="cuda",
                    steps: int = 6) -> dict:
    """TracInIdeal recorded while training the same model on two devices: relative error of `ideal`."""
    (X, y), (Xt, yt) = data
    results = []
    for dev in (device_a, device_b):
        torch.manual_seed(0)
        model = model_fn().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = te.TracInIdealRecorder(model, F.cross_entropy, (Xt, yt), n_train=len(X))
        for s in range(steps):
            idx = torch.arange(s * 4, s * 4 + 4) % len(X)
            xb, yb = X[idx].to(dev), y[idx].to(dev)
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            with rec.step(idx, xb, yb, lr=0.1):
                opt.step()
        results.append(rec.ideal)
    return {"ideal_rel_err": rel_err(results[1], results[0]), "ideal_device": str(results[1].device)}


def source_models() -> dict[str, Callable[[], tuple]]:
    """SOURCE cases for source_agreement: name -> () -> (float64 model, data, loss_fn). A causal LM with
    every layer (sampled curvature: label draws from CPU generators, the same on any device; an embedding,
    RMSNorms as vector blocks), an LSTM text model (exact curvature; recurrent and embedding blocks), a ViT
    (parameters without a handler) and a Linear on a table the batch shares (moved to the generic block)."""
    from models import Recurrent, SharedTable, ViT, hf_llama, token_batch

    def lm():
        torch.manual_seed(0)
        return hf_llama(vocab=30, dim=16, depth=1, heads=2, seq=8).double(), token_batch(8, 8, 30), "causal_lm"

    def lstm():
        torch.manual_seed(0)
        return Recurrent("LSTM", vocab=20, dim=4, hidden=5).double(), (token_batch(8, 6, 20),
                                                                         torch.randint(0, 3, (8,))), F.cross_entropy
    def vit():     # cls_token / pos_embed: the generic block, pseudo-gradients from per-example copies
        torch.manual_seed(0)
        return ViT(dim=4, classes=3).double().eval(), (torch.randn(8, 3, 8, 8, dtype=torch.float64),
                                                       torch.randint(0, 3, (8,))), F.cross_entropy

    def shared():  # a Linear on a table the batch shares: moved to the generic block, the per-example loop
        torch.manual_seed(0)
        return SharedTable(6).double(), (torch.randn(8, 6, 4, dtype=torch.float64),
                                         torch.randint(0, 3, (8,))), F.cross_entropy
    return {"llama_every_layer": lm, "lstm": lstm, "vit_every_parameter": vit, "shared_table": shared}


def source_agreement(build: Callable[[], tuple], device_a: str = "cpu", device_b: str = "cuda") -> dict:
    """SOURCE built on two devices from the same model and data: relative errors of the scores (training
    examples on the first 3) and of the self-influence, and the curvature each used."""
    out = {}
    for dev in (device_a, device_b):
        model, data, loss = build()
        ckpts = te.Checkpoints([te.Checkpoint(model.state_dict(), 0.1, 20)])
        index = te.TracIn(model, ckpts, loss_fn=loss, device=dev).index(data, method="source", progress=False,
                                                                        batch_size=4)
        test = tuple(d[:3] for d in data) if isinstance(data, tuple) else data[:3]
        out[dev] = (index.influence(test), index.self_influence(), index.settings.curvature)
    (sa, ia, ca), (sb, ib, cb) = out[device_a], out[device_b]
    return {"scores_rel_err": rel_err(sb, sa), "self_rel_err": rel_err(ib, ia), "curvature": [ca, cb]}


@contextmanager
def counting_syncs(device: str):
    """Count synchronizing CUDA calls inside the block (torch.cuda.set_sync_debug_mode("warn"));
    yields a dict whose "syncs" is filled on exit (0 off CUDA, where nothing synchronizes)."""
    result = {"syncs": 0}
    if torch.device(device).type != "cuda":
        yield result
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield result
        finally:
            torch.cuda.set_sync_debug_mode("default")
    result["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
