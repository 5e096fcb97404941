"""Exact rescoring of projected candidates (GradientIndex.top_k(rerank=M)) against exact mode, CPU or GPU.

Prints one JSON object. Run from the repository root:
    PYTHONPATH=.:tests:benchmarks .venv/bin/python benchmarks/bench_rerank.py [--models gpt2,bert] [--data topics]
The models, data and training of bench_real_models.py (GPT-2-style causal LM and BERT-style encoder,
4 layers, hidden 256, sequence 128). Per model: an exact index and a factored index (proj_dim 4096) of
n_train examples; n_test held-out queries; then per M in --candidates (integers and "auto"):
    top10_overlap                 top-10 proponents of top_k(test, rerank=M) (all n_test test examples in one
                                  call: candidates are the union U over them) vs exact mode (M = 0: projection only)
    top10_overlap_opponents       the same for the 10 opponents
    scores_exact                  max |reranked score - exact score| / max |exact score|
    union_per_test                |U| / n_test: exact gradients recomputed per test example in that call
    per_query_rescored            one test example per call: [min, mean, max] training examples rescored
    batch_query_s                 wall time of that call
    per_query_*                   the same, one test example per call (its own 2 M candidates; a gallery's
                                  click): overlaps, and seconds per query
and the exact and factored index build times, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import tracin_engine as te

from bench_real_models import build, fit, overlap


def fitted(name: str, data: str, steps: int | None, device: torch.device):
    """(model, checkpoints, loss_fn, description, X, y) after the training bench_real_models does."""
    model, (X, y), loss_fn, desc = build(name, False, data)
    model.to(device)
    fit(model, X, y, loss_fn, data != "random", steps, 16, device)
    model.eval()
    ckpts = te.Checkpoints.from_state_dicts([{k: v.detach().clone() for k, v in model.state_dict().items()}], [1.0])
    return model, ckpts, loss_fn, desc, X, y


def run_model(name: str, args, device: torch.device) -> dict:
    model, ckpts, loss_fn, desc, X, y = fitted(name, args.data, args.steps, device)
    train, test = (X[:args.n_train], y[:args.n_train]), (X[-args.n_test:], y[-args.n_test:])
    t0 = time.perf_counter()
    exact = te.TracIn(model, ckpts, loss_fn=loss_fn, device=device).index(train, progress=False, batch_size=16)
    exact_s = time.perf_counter() - t0
    truth = exact.top_k(test, k=10)
    S = exact.influence(test).double()
    del exact
    t0 = time.perf_counter()
    proj = te.TracIn(model, ckpts, loss_fn=loss_fn, proj_dim=args.proj_dim, device=device).index(
        train, progress=False, batch_size=16)
    proj_s = time.perf_counter() - t0
    out = {"model": desc, "data": args.data, "n_train": args.n_train, "n_test": args.n_test,
           "params": sum(p.numel() for p in model.parameters()), "proj_dim": args.proj_dim,
           "index_exact_s": round(exact_s, 1), "index_factored_s": round(proj_s, 1), "rerank": []}
    proj.top_k(test, k=10, rerank=10, train_data=train)          # warm-up: the exact TracIn, the data check
    one = lambda i: (test[0][i:i + 1], test[1][i:i + 1])        # noqa: E731
    for M in [0] + [m if m == "auto" else int(m) for m in args.candidates.split(",")]:
        t0 = time.perf_counter()
        best = proj.top_k(test, k=10) if M == 0 else proj.top_k(test, k=10, rerank=M, train_data=train)
        dt = time.perf_counter() - t0
        row = {"candidates": M, "batch_query_s": round(dt, 2),
               "top10_overlap": overlap(truth.proponents.indices, best.proponents.indices),
               "top10_overlap_opponents": overlap(truth.opponents.indices, best.opponents.indices)}
        if M:
            union = proj.last_rerank["rescored"]
            err = max(float((nb.scores.double() - S.gather(1, nb.indices)).abs().max())
                      for nb in (best.proponents, best.opponents))
            t0 = time.perf_counter()
            alone, rescored = [], []
            for i in range(args.n_test):
                alone.append(proj.top_k(one(i), k=10, rerank=M, train_data=train))
                rescored.append(proj.last_rerank["rescored"])
            per_s = (time.perf_counter() - t0) / args.n_test
            row.update({"union_per_test": round(union / args.n_test, 1),
                        "per_query_rescored": [min(rescored), round(sum(rescored) / len(rescored), 1), max(rescored)],
                        "scores_exact": float(f"{err / float(S.abs().max()):.2e}"),
                        "per_query_s": round(per_s, 2),
                        "per_query_top10_overlap": overlap(truth.proponents.indices,
                                                           torch.cat([a.proponents.indices for a in alone])),
                        "per_query_top10_overlap_opponents": overlap(truth.opponents.indices,
                                                                     torch.cat([a.opponents.indices for a in alone]))})
        out["rerank"].append(row)
        print(json.dumps({name: row}), file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,bert")
    ap.add_argument("--data", choices=("random", "topics", "phrases"), default="topics")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--proj-dim", type=int, default=4096)
    ap.add_argument("--n-train", type=int, default=192)
    ap.add_argument("--n-test", type=int, default=16)
    ap.add_argument("--candidates", default="10,20,30,50,auto", help="values of rerank= (integers, 'auto')")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": args.device, "load_avg_start": [round(v, 2) for v in os.getloadavg()]},
              "settings": vars(args), "models": {}}
    for name in args.models.split(","):
        result["models"][name] = run_model(name, args, device)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
