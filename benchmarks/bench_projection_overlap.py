"""Top-10 proponent overlap with exact mode: factored vs dense Gaussian projection on a small trained encoder.

Prints one JSON object. Run: PYTHONPATH=.:tests .venv/bin/python benchmarks/bench_projection_overlap.py
Model: tests/models.py Encoder (vocab 2000, dim 64, 2 blocks, 4 heads, sequence 32, padding masks),
230 k parameters, trained 30 full-batch SGD steps (lr 0.05, momentum 0.9) on 80 random-token examples
with random binary labels; 16 test examples; one checkpoint. For proj_dim 1024 and 4096 and both
projections: overlap of the top-10 proponents with exact mode, and the index time (s).
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

import tracin_engine as te
from models import Encoder, token_batch


def main() -> None:
    torch.manual_seed(0)
    V, T, n = 2000, 32, 96
    m = Encoder(V, 64, 2, 4, T, 2)
    ids = token_batch(n, T, V, seed=1)
    ids[ids > 1] = torch.randint(2, V, (int((ids > 1).sum()),))
    y = torch.randint(0, 2, (n,))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(m(ids[:80]), y[:80]).backward()
        opt.step()
    m.eval()
    ck = te.Checkpoints.from_state_dicts([m.state_dict()], [1.0])
    train, test = (ids[:80], y[:80]), (ids[80:], y[80:])
    ex = te.TracIn(m, ck, loss_fn=F.cross_entropy).index(train, progress=False).top_k(test, k=10).proponents.indices
    out = {"params": sum(p.numel() for p in m.parameters()), "n_train": 80, "n_test": 16, "runs": []}
    for kind in ("factored", "gaussian"):
        for pd in (1024, 4096):
            t0 = time.perf_counter()
            tk = te.TracIn(m, ck, loss_fn=F.cross_entropy, proj_dim=pd, projection=kind).index(
                train, progress=False).top_k(test, k=10).proponents.indices
            ov = sum(len(set(ex[i].tolist()) & set(tk[i].tolist())) for i in range(len(ex))) / ex.numel()
            out["runs"].append({"projection": kind, "proj_dim": pd, "top10_overlap": round(ov, 3),
                                "index_s": round(time.perf_counter() - t0, 1)})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
