"""Engine benchmark (issue 2): digits, small CNN, 4 checkpoints, beside Captum TracInCP, on one device.

Prints one JSON object. Run: .venv/bin/python benchmarks/bench_engine.py [--repeats 5] [--device cpu|cuda]
Both tools run on --device (default: CPU), named in "machine"; every timed call is warmed up once
first and timed between device synchronizations (devices.synchronize).
Measures, in the same process and on the same model and data:
  featurize_s            tracin.index(train): per-example gradients of 1500 examples x 4 checkpoints
  query_one_topk_ms      index.top_k(one test example, k=10), including its 4 test gradients (median)
  query_all_topk_s       index.top_k(all 297 test examples, k=10)
  captum_one_s           TracInCP.influence(one test example) (scores for every training example)
  captum_one_topk_s      TracInCP.influence(one test example, k=10)
  captum_all_s           TracInCP.influence(all test examples)
Captum runs with sample_wise_grads_per_batch=True and reduction="sum" (its fastest exact mode).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import tracin_engine as te
from tracin_engine.devices import synchronize
from tracin_engine.examples import DigitsCNN, load_digits_split, train

DEVICE = torch.device("cpu")


def timed(fn, repeats: int, warm: bool = True) -> tuple[float, object]:
    """Median seconds of `repeats` calls (after one untimed warm-up call), synchronizing the device."""
    if warm:
        fn()
    times, out = [], None
    for _ in range(repeats):
        synchronize(DEVICE)
        t0 = time.perf_counter()
        out = fn()
        synchronize(DEVICE)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--query-repeats", type=int, default=200, help="timed one-example queries (median)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.manual_seed(0)
    data = load_digits_split(seed=0)
    model = DigitsCNN()
    run = tempfile.mkdtemp(prefix="bench_engine_")
    t0 = time.perf_counter()
    train(model, data.train, run, epochs=8, n_checkpoints=4, lr=0.1, lr_decay=0.8)
    train_s = time.perf_counter() - t0
    ckpts = te.Checkpoints.from_dir(run)
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device=DEVICE)
    Xt, yt = data.test
    one = (Xt[:1], yt[:1])

    featurize_s, index = timed(lambda: tracin.index(data.train, progress=False), 3)
    q_one, _ = timed(lambda: index.top_k(one, k=10), args.query_repeats)  # warm-up caches checkpoints
    q_all, _ = timed(lambda: index.top_k(data.test, k=10), args.repeats)

    def load(m, path):
        payload = torch.load(path, weights_only=True, map_location=DEVICE)
        m.load_state_dict(payload["state_dict"])
        return payload["learning_rate"]

    on_dev = lambda t: tuple(a.to(DEVICE) for a in t)  # noqa: E731 - Captum gets its data on the device
    one_dev, test_dev = on_dev(one), on_dev(data.test)
    captum = __import__("captum.influence", fromlist=["TracInCP"]).TracInCP(
        copy.deepcopy(model).to(DEVICE), TensorDataset(*on_dev(data.train)), [str(c.source) for c in ckpts],
        checkpoints_load_func=load, loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
        batch_size=256, sample_wise_grads_per_batch=True)
    c_one, _ = timed(lambda: captum.influence(one_dev), args.repeats)
    c_one_k, _ = timed(lambda: captum.influence(one_dev, k=10), args.repeats)
    c_all, _ = timed(lambda: captum.influence(test_dev), 2, warm=False)  # warmed by the calls above

    name = (torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda"
            else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    out = {
        "machine": f"{name}, torch {torch.__version__}", "device": str(DEVICE),
        "model": f"DigitsCNN, {tracin.num_params} parameters, 4 checkpoints",
        "n_train": len(data.train[1]), "n_test": len(yt),
        "feature_dim_per_checkpoint": tracin.dim, "per_example": tracin.featurizer.mode,
        "training_8_epochs_s": round(train_s, 3),
        "featurize_s": round(featurize_s, 4),
        "query_one_topk_ms": round(q_one * 1e3, 3),
        "query_all_topk_s": round(q_all, 4),
        "captum_one_s": round(c_one, 4),
        "captum_one_topk_s": round(c_one_k, 4),
        "captum_all_s": round(c_all, 4),
        "speedup_one_query_vs_captum": round(c_one / q_one, 1),
        "speedup_one_topk_vs_captum_topk": round(c_one_k / q_one, 1),
        "featurize_in_captum_one_queries": round(featurize_s / c_one, 2),
        "speedup_all_test_vs_captum": round(c_all / q_all, 1),
        "targets": {"one_query_speedup_ge_100": c_one / q_one >= 100,
                    "featurize_le_2_captum_queries": featurize_s <= 2 * c_one},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
