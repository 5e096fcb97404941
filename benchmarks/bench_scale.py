"""Scale benchmark (issue 3): featurization vs training throughput, query latency over 50k stored
examples, self-influence, Captum TracInCP, and projection quality against exact mode.

Prints one JSON object. Run: .venv/bin/python benchmarks/bench_scale.py [--device cuda|cpu] [--seeds N]
[--only query] (the query and self-influence only, after the short training that writes the checkpoints)
[--only gpu-check] (training and factored featurization throughput, then the query: what scripts/gpu-check
runs; no Captum, no overlap study). Every timed call is warmed up first and timed between
device synchronizations; TracIn and Captum run on the same --device, named in "machine".
On CUDA: a CIFAR-shaped convnet of ~4.2M parameters (width 64) on synthetic 3x32x32 inputs. On CPU a
smaller case (width 16, 266k parameters, fewer examples) so the run stays under 5 minutes on 2 cores.
Measures, in the same run:
  train_examples_per_s       SGD forward+backward+step of the same model, batch `batch` (best of
                             `rounds`, alternating with the factored featurization below)
  featurize_*_examples_per_s tracin.index over n_feat examples at ONE checkpoint, proj_dim, per
                             projection ("factored": hooks, never a per-example gradient; "gaussian":
                             exact per-example gradients times a blockwise Gaussian R, on fewer examples)
  ratio_*                    featurization / training throughput
  query_*                    top-10 for one test example over n_query stored examples x 4 checkpoints
                             (stored features are random numbers of the real layout: timing only),
                             split into the test gradients (4 forward+backward) and the scoring;
                             scoring both from the store kept where queries run (on CUDA: resident
                             on the GPU once, float16) and from the same store memory-mapped on disk
                             (on CUDA: streamed from pinned memory per query; on CPU: read in place)
  self_influence_s           index.self_influence() over the same store
  captum_*                   Captum TracInCP.influence(one example, k=10) over a subset of n_captum
                             training examples, linearly extrapolated to n_query (stated in the output)
  digits_overlap             top-10 proponent overlap with exact mode on the digits CNN (1500 train,
                             297 test, 4 checkpoints), gaussian and factored, several proj_dim
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import tracin_engine as te
from tracin_engine.examples import DigitsCNN, load_digits_split, train
from tracin_engine.store.residency import DeviceFeatures
from tracin_engine.store.scoring import score_blocks
from tracin_engine.store.topk import reference_top_k, streaming_top_k


class CifarNet(nn.Module):
    """conv(3,w) conv(w,2w) pool conv(2w,4w) conv(4w,4w) pool conv(4w,8w) pool fc(8w*16, 4w) fc(4w, 10)."""

    def __init__(self, w: int = 64):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(a, b, 3, padding=1) for a, b in
                                    [(3, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w), (4 * w, 8 * w)]])
        self.fc1, self.fc2 = nn.Linear(8 * w * 16, 4 * w), nn.Linear(4 * w, 10)

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in (1, 3, 4):
                x = F.max_pool2d(x, 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def log(msg: str) -> None:
    print(f"[bench_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(fn, device, repeats=1):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def train_throughput(model, X, y, batch, device, run_dir, n_ckpt=4):
    """examples/s of SGD steps; saves n_ckpt checkpoints (state_dict + learning rate) afterwards."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    steps = len(X) // batch
    for s in range(1):  # warm-up
        F.cross_entropy(model(X[:batch].to(device)), y[:batch].to(device)).backward()
    opt.zero_grad()
    paths = []
    sync(device)
    t0 = time.perf_counter()
    for s in range(steps):
        xb, yb = X[s * batch:(s + 1) * batch].to(device), y[s * batch:(s + 1) * batch].to(device)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    sync(device)
    rate = steps * batch / (time.perf_counter() - t0)
    for c in range(n_ckpt):  # short extra training between checkpoints (untimed)
        for s in range(1):
            opt.zero_grad()
            xb, yb = X[s * batch:(s + 1) * batch].to(device), y[s * batch:(s + 1) * batch].to(device)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        p = Path(run_dir) / f"ckpt_{c}.pt"
        torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "learning_rate": 0.01}, p)
        paths.append(p)
    model.eval()
    return rate, paths


def featurize_rate(model, ckpt_path, X, y, proj_dim, projection, batch, device, warm=True, tf32="auto"):
    ck = te.Checkpoints.from_files([ckpt_path], learning_rates=[0.01])
    tracin = te.TracIn(model, ck, loss_fn=F.cross_entropy, proj_dim=proj_dim, projection=projection, device=device,
                       tf32=tf32)
    if warm:
        tracin.index((X[:batch], y[:batch]), progress=False, batch_size=batch)
    sec, _ = clock(lambda: tracin.index((X, y), progress=False, batch_size=batch), device)
    return len(X) / sec, tracin.dim


def overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    ia, ib = reference_top_k(a, k).proponents.indices, reference_top_k(b, k).proponents.indices
    return sum(len(set(ia[i].tolist()) & set(ib[i].tolist())) for i in range(len(ia))) / ia.numel()


def digits_overlap(device, seeds: int) -> dict:
    torch.manual_seed(0)
    data = load_digits_split(seed=0)
    model = DigitsCNN()
    run = tempfile.mkdtemp(prefix="bench_scale_digits_")
    train(model, data.train, run, epochs=8, n_checkpoints=4, lr=0.1, lr_decay=0.8)
    ckpts = te.Checkpoints.from_dir(run)
    exact = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device=device).index(data.train, progress=False)
    s_exact = exact.influence(data.test).cpu()
    out = {"model": f"DigitsCNN, {exact.tracin.num_params} parameters, exact row {exact.store.dim} numbers"}
    for pd in (256, 1024, 4096):
        for kind in ("gaussian", "factored"):
            vals = []
            for seed in range(seeds):
                t = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=pd, projection=kind, seed=seed,
                              device=device)
                vals.append(overlap(s_exact, t.index(data.train, progress=False).influence(data.test).cpu()))
            out[f"{kind}_{pd}"] = {"row_dim": t.dim, "overlap_mean": round(sum(vals) / seeds, 4), "seeds": seeds,
                                   "overlap_min": round(min(vals), 4)}
    return out


def query_latency(model, paths, X, y, proj_dim, n_query, repeats, device) -> dict:
    """top-10 of one test example over n_query stored rows x 4 checkpoints (random values in the
    factored layout, float16: timing only), split into test gradients and scoring; self-influence;
    scoring from the in-memory store (resident on the GPU) and from the memory-mapped copy on disk."""
    ckpts = te.Checkpoints.from_files(paths)
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=proj_dim, projection="factored",
                       device=device)
    one = (X[:1], y[:1])
    tracin.features(one)  # settles the layout: tracin.dim is provisional until a batch has been seen
    store = te.FeatureStore(n_query, 4, tracin.dim, torch.float16)
    block = torch.randn(5000, tracin.dim, generator=torch.Generator().manual_seed(1)) * 1e-2
    block_norms = tracin.featurizer.sq_norms(block)
    for c in range(4):  # the same random block repeated (values do not matter for timing)
        for s in range(0, n_query, len(block)):
            b = min(len(block), n_query - s)
            store.write(c, s, block[:b], block_norms[:b])
    index = te.GradientIndex(tracin, store)
    index.top_k(one, k=10)  # warm-up: caches the 4 checkpoints, makes the store resident on a GPU (once)
    q_total, _ = clock(lambda: index.top_k(one, k=10), device, repeats)
    q_grad, t = clock(lambda: tracin.features(one, out_device=device), device, repeats)
    q_score, _ = clock(lambda: index.top_k(features=t, k=10), device, repeats)
    si, _ = clock(lambda: index.self_influence(), device, 5)
    disk_dir = tempfile.mkdtemp(prefix="bench_scale_store_")
    disk = store.copy_to(Path(disk_dir) / "ix", tracin.metadata())
    mapped = DeviceFeatures(disk, device, mode="stream" if device.type == "cuda" else "direct")
    lrs, layout = index.learning_rates, index.layout

    def mapped_query():
        return streaming_top_k(score_blocks(t, mapped, lrs, layout), 10)

    mapped_query()  # warm-up (page cache, pinned buffers)
    q_mapped, _ = clock(mapped_query, device, repeats)
    log("query and self-influence done")
    return {"factored_row_dim": tracin.dim, "query_n_stored": n_query, "query_checkpoints": 4,
            "store_dtype": "float16", "store_mode": index.device_features().mode,
            "query_top10_total_ms": round(q_total * 1e3, 2),
            "query_test_gradients_ms": round(q_grad * 1e3, 2),
            "query_scoring_top10_ms": round(q_score * 1e3, 2),
            "memmap_mode": mapped.mode,
            "query_scoring_top10_memmap_ms": round(q_mapped * 1e3, 2),
            "self_influence_ms": round(si * 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--proj-dim", type=int, default=4096)
    ap.add_argument("--n-query", type=int, default=50000)
    ap.add_argument("--seeds", type=int, default=None, help="projection seeds per overlap figure "
                    "(default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--only", choices=["query", "gpu-check"], default=None, help="query: train only to write "
                    "the 4 checkpoints, then measure the query and self-influence (skips featurization, Captum, "
                    "digits overlap); gpu-check: training and factored featurization throughput, then the query")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    cfg = (dict(width=64, n_train=16384, n_feat=8192, n_gauss=256, gauss_batch=256, batch=512, n_captum=2048,
                repeats=5, seeds=3, rounds=3) if gpu else
           dict(width=16, n_train=512, n_feat=256, n_gauss=8, gauss_batch=8, batch=128, n_captum=128,
                repeats=2, seeds=1, rounds=3))
    torch.manual_seed(0)
    X = torch.randn(cfg["n_train"], 3, 32, 32)
    y = torch.randint(0, 10, (cfg["n_train"],))
    model = CifarNet(cfg["width"]).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    run = tempfile.mkdtemp(prefix="bench_scale_")
    train_rate, paths = train_throughput(model, X, y, cfg["batch"], device, run)
    log("training throughput done")
    head = {"machine": (torch.cuda.get_device_name(device) if gpu else
                        f"{platform.machine()} CPU, {torch.get_num_threads()} threads (2-core container, no GPU)")
                       + f", torch {torch.__version__}",
            "model": f"CifarNet(width={cfg['width']}), {n_params} parameters, synthetic 3x32x32, 10 classes",
            "proj_dim": args.proj_dim}
    if args.only == "query":
        query = query_latency(model, paths, X, y, args.proj_dim, args.n_query, cfg["repeats"], device)
        print(json.dumps({**head, **query}, indent=1))
        return
    # training and factored featurization alternate `rounds` times; best of each (robust to other load)
    fact_rate, _ = featurize_rate(model, paths[-1], X[:cfg["n_feat"]], y[:cfg["n_feat"]], args.proj_dim,
                                  "factored", cfg["batch"], device)
    for _ in range(cfg["rounds"] - 1):
        train_rate = max(train_rate, train_throughput(copy.deepcopy(model), X, y, cfg["batch"], device,
                                                      tempfile.mkdtemp(prefix="bench_scale_"), 0)[0])
        fact_rate = max(fact_rate, featurize_rate(model, paths[-1], X[:cfg["n_feat"]], y[:cfg["n_feat"]],
                                                  args.proj_dim, "factored", cfg["batch"], device)[0])
    log("factored featurization done")
    if args.only == "gpu-check":
        extra = {}
        if gpu:   # the default (tf32="auto") allows TF32 for this projected index, as the training step's
            # cuDNN convolutions by PyTorch's default; also IEEE float32 (tf32=False) for comparison
            ieee_rate = max(featurize_rate(model, paths[-1], X[:cfg["n_feat"]], y[:cfg["n_feat"]], args.proj_dim,
                                           "factored", cfg["batch"], device, tf32=False)[0] for _ in range(2))
            extra = {"training_tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                                       "matmul": torch.backends.cuda.matmul.allow_tf32},
                     "featurize_factored_tf32_off_examples_per_s": round(ieee_rate, 1),
                     "ratio_factored_tf32_off_to_training": round(ieee_rate / train_rate, 3)}
        query = query_latency(model, paths, X, y, args.proj_dim, args.n_query, cfg["repeats"], device)
        print(json.dumps({**head, "train_examples_per_s": round(train_rate, 1),
                          "featurize_factored_examples_per_s": round(fact_rate, 1),
                          "ratio_factored_to_training": round(fact_rate / train_rate, 3), **extra, **query}, indent=1))
        return
    gauss_rate, _ = featurize_rate(model, paths[-1], X[:cfg["n_gauss"]], y[:cfg["n_gauss"]], args.proj_dim,
                                   "gaussian", cfg["gauss_batch"], device, warm=False)

    log("gaussian featurization done")
    query = query_latency(model, paths, X, y, args.proj_dim, args.n_query, cfg["repeats"], device)
    # Captum TracInCP over a subset, extrapolated linearly in the number of training examples
    def load(m, path):
        payload = torch.load(path, weights_only=True)
        m.load_state_dict(payload["state_dict"])
        return payload["learning_rate"]

    from captum.influence import TracInCP

    sub = TensorDataset(X[:cfg["n_captum"]].to(device), y[:cfg["n_captum"]].to(device))
    captum = TracInCP(copy.deepcopy(model), sub, [str(p) for p in paths], checkpoints_load_func=load,
                      loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=cfg["batch"],
                      sample_wise_grads_per_batch=True)
    one_dev = (X[:1].to(device), y[:1].to(device))
    captum.influence(one_dev, k=10)  # warm-up
    c_sub, _ = clock(lambda: captum.influence(one_dev, k=10), device, 1)
    c_ext = c_sub * args.n_query / cfg["n_captum"]

    log("captum done")
    out = {
        **head,
        "train_examples_per_s": round(train_rate, 1),
        "featurize_factored_examples_per_s": round(fact_rate, 1),
        "featurize_gaussian_examples_per_s": round(gauss_rate, 2),
        "ratio_factored_to_training": round(fact_rate / train_rate, 3),
        "ratio_gaussian_to_training": round(gauss_rate / train_rate, 4),
        "featurize_examples": {"factored": cfg["n_feat"], "gaussian": cfg["n_gauss"]},
        **query,
        "captum_subset_examples": cfg["n_captum"],
        "captum_one_query_topk_subset_s": round(c_sub, 3),
        "captum_one_query_topk_extrapolated_s": round(c_ext, 2),
        "captum_note": f"measured on {cfg['n_captum']} training examples, extrapolated linearly to {args.n_query}",
        "speedup_query_vs_captum_extrapolated": round(c_ext / (query["query_top10_total_ms"] / 1e3), 1),
        "digits_overlap": digits_overlap(device, args.seeds or cfg["seeds"]),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
