"""Cost of the store's identity checks (issue 14): content digests of checkpoints and training data.

Prints one JSON object. Run: .venv/bin/python benchmarks/bench_fingerprint.py
  data_mb_per_s          fingerprint.data_fingerprint over 256 MB of float32 inputs + int64 labels
  state_mb_per_s         fingerprint.state_digest over a 64M-parameter float32 state dict (256 MB)
  digits_fingerprints_s  both fingerprints as tracin.index computes them for the digits (1500 train,
                         4 DigitsCNN checkpoint files: loading them included, which featurizing
                         would otherwise do itself)
Best of 3 rounds each.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time

import torch

import tracin_engine as te
from tracin_engine.data import as_source
from tracin_engine.examples import DigitsCNN, load_digits_split, train
from tracin_engine.fingerprint import data_fingerprint, state_digest


def best(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    X, y = torch.randn(2**16, 1024), torch.randint(0, 10, (2**16,))  # 256 MB of inputs
    data_mb = (X.numel() * 4 + y.numel() * 8) / 2**20
    data_s = best(lambda: data_fingerprint(as_source((X, y))))
    state = {f"layer{i}.weight": torch.randn(4096, 4096) for i in range(4)}  # 64M parameters
    state_s = best(lambda: state_digest(state))
    del X, y, state

    split = load_digits_split(seed=0)
    model = DigitsCNN()
    run = tempfile.mkdtemp()
    train(model, split.train, run, epochs=2, n_checkpoints=4, lr=0.1)

    def fingerprints():
        fresh = te.Checkpoints.from_dir(run)
        fresh.fingerprint()
        data_fingerprint(as_source(split.train))

    fp_s = best(fingerprints)
    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "data_mb_per_s": round(data_mb / data_s), "state_mb_per_s": round(256 / state_s),
        "digits_fingerprints_s": round(fp_s, 4),
    }, indent=1))


if __name__ == "__main__":
    main()
