"""Linear datamodeling score (LDS) of TracIn, TracIn-cosine, dropout-ensembled TracIn and SOURCE (issue 7).

Prints one JSON object. Run: .venv/bin/python benchmarks/lds.py [--subsets 100 --seeds 8 --epochs 10]

Setup: sklearn digits (1500 train / 297 test, flattened 8x8), an MLP 64-32-32-10 with dropout 0.1,
SGD with momentum 0.9, lr 0.05, batch 64, 10 epochs, 6 checkpoints recorded by CheckpointRecorder.
Every method scores all (test, train) pairs from the full-data run's checkpoints (TracIn: 6
checkpoints; SOURCE: L segments of them; ensemble: 5 fixed dropout masks).
Ground truth: `--subsets` random halves S_j of the training set, each retrained `--seeds` times
from the full run's initialization with the same hyperparameters (data order and dropout vary by
seed; the subset models train together with batched matmuls, see train_many);
y_j(z') = mean over seeds of the test loss of z' minus the full model's test loss.
Prediction of a method with scores s(z', z) (positive = proponent: lowers the test loss):
    yhat_j(z') = -sum_{z in S_j} s(z', z)
LDS = mean over test examples z' of Spearman_j(yhat_j(z'), y_j(z')).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

import tracin_engine as te
from tracin_engine.examples import load_digits_split


class DropoutMLP(nn.Module):
    def __init__(self, hidden: int = 32, p: float = 0.1):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)
        self.drop1, self.drop2 = nn.Dropout(p), nn.Dropout(p)

    def forward(self, x):
        h = self.drop1(F.relu(self.fc1(x.flatten(1))))
        return self.fc3(self.drop2(F.relu(self.fc2(h))))


def train_many(init: dict, X, y, subsets: torch.Tensor, seeds: list[int], args, save_steps=()):
    """R = len(subsets) DropoutMLPs trained at once (batched matmuls), same math as nn + torch.optim.SGD:
    inverted dropout, mean cross-entropy per model, buf = momentum buf + grad, w -= lr buf.

    subsets: (R, m) training indices; seeds: R seeds (data order and dropout masks).
    Returns the final parameters {name: (R, ...)} and, for steps in save_steps, snapshots of them.
    """
    R, m = subsets.shape
    W = {k: v.detach().unsqueeze(0).repeat(R, *[1] * v.dim()).clone().requires_grad_(True) for k, v in init.items()}
    buf = {k: None for k in W}
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    drop_gen = torch.Generator().manual_seed(seeds[0] * 7919 + 1)
    p, snaps, step = args.dropout, {}, 0

    def layer(h, name):
        return torch.baddbmm(W[name + ".bias"].unsqueeze(1), h, W[name + ".weight"].transpose(1, 2))

    def drop(h):
        return h * (torch.rand(h.shape, generator=drop_gen) >= p) / (1 - p)

    for _ in range(args.epochs):
        perm = torch.stack([torch.randperm(m, generator=g) for g in gens])
        order = subsets.gather(1, perm)
        for s in range(0, m, args.batch_size):
            idx = order[:, s:s + args.batch_size]                                  # (R, B)
            h = drop(F.relu(layer(X[idx], "fc1")))
            h = drop(F.relu(layer(h, "fc2")))
            out = layer(h, "fc3")
            loss = F.cross_entropy(out.flatten(0, 1), y[idx].flatten(), reduction="sum") / idx.shape[1]
            grads = torch.autograd.grad(loss, list(W.values()))
            with torch.no_grad():
                for (k, w), g in zip(W.items(), grads):
                    buf[k] = g.clone() if buf[k] is None else buf[k].mul_(args.momentum).add_(g)
                    w.sub_(args.lr * buf[k])
            step += 1
            if step in save_steps:
                snaps[step] = {k: v.detach().clone() for k, v in W.items()}
    return {k: v.detach() for k, v in W.items()}, snaps


def batched_test_losses(W: dict, Xt, yt) -> torch.Tensor:
    """(R, n_test) per-example test losses of R models (eval mode: no dropout)."""
    def layer(h, name):
        return torch.baddbmm(W[name + ".bias"].unsqueeze(1), h, W[name + ".weight"].transpose(1, 2))
    x = Xt.unsqueeze(0).expand(W["fc1.weight"].shape[0], -1, -1)
    out = layer(F.relu(layer(F.relu(layer(x, "fc1")), "fc2")), "fc3")
    return F.cross_entropy(out.transpose(1, 2), yt.unsqueeze(0).expand(out.shape[0], -1), reduction="none")


def lds(scores: torch.Tensor, masks: torch.Tensor, actual: torch.Tensor) -> float:
    """scores (m, n), masks (J, n) 0/1, actual (J, m) -> mean over test examples of Spearman over J."""
    pred = -(masks.double() @ scores.double().T)          # (J, m)
    rho = [spearmanr(pred[:, i], actual[:, i]).statistic for i in range(actual.shape[1])]
    return float(np.nanmean(rho))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--members", type=int, default=5)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    data = load_digits_split(seed=0)
    (X, y), (Xt, yt) = data.train, data.test
    X, Xt = X.flatten(1), Xt.flatten(1)
    n = len(X)
    torch.manual_seed(0)
    init = DropoutMLP(p=args.dropout).state_dict()
    steps_per_epoch = -(-n // args.batch_size)
    total = args.epochs * steps_per_epoch
    save_steps = [round(total * (i + 1) / args.checkpoints) for i in range(args.checkpoints)]
    final, snaps = train_many(init, X, y, torch.arange(n).unsqueeze(0), [0], args, save_steps)
    # record the full run's checkpoints the way a user would: CheckpointRecorder + the SGD optimizer
    model = DropoutMLP(p=args.dropout)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    run_dir = tempfile.mkdtemp(prefix="lds_run_")
    recorder = te.CheckpointRecorder(run_dir)
    for step in save_steps:
        model.load_state_dict({k: v[0] for k, v in snaps[step].items()})
        recorder.save(model, opt, step)
    model.eval()
    full_loss = batched_test_losses(final, Xt, yt)[0]
    ckpts = te.Checkpoints.from_dir(run_dir)
    test = (Xt, yt)

    # -- attribution scores (all from the full run) --------------------------------------------------
    timings, scores = {}, {}
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")

    def timed(name, fn):
        t0 = time.perf_counter()
        scores[name] = fn().cpu()
        timings[name] = round(time.perf_counter() - t0, 2)

    index = tracin.index((X, y), progress=False)
    timed("tracin", lambda: index.influence(test))
    timed("tracin_cosine", lambda: index.similarity(test))
    timed("tracin_last_checkpoint", lambda: index.influence_per_checkpoint(test)[-1])
    timed("tracin_dropout_ensemble", lambda: te.dropout_ensemble(
        tracin, (X, y), n_members=args.members, progress=False).influence(test))
    for L in sorted({1, 2, args.checkpoints // 2, args.checkpoints} - {0}):
        if args.checkpoints % L == 0:
            timed(f"source_L{L}", lambda L=L: tracin.index((X, y), method="source", segments=L,
                                                          progress=False).influence(test))
    last = te.TracIn(model, ckpts[len(ckpts) - 1:], loss_fn=F.cross_entropy, device="cpu")
    timed("source_L1_last_checkpoint", lambda: last.index(           # ~ influence function at the end
        (X, y), method="source", segments=1, progress=False).influence(test))
    L = args.checkpoints // 2
    timed(f"source_L{L}_dropout_ensemble", lambda: te.dropout_ensemble(
        tracin, (X, y), n_members=args.members, method="source", segments=L, progress=False).influence(test))

    # -- ground truth: retrain on random halves ------------------------------------------------------
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(1234)
    masks = torch.zeros(args.subsets, n)
    keeps = torch.stack([torch.randperm(n, generator=gen)[: n // 2] for _ in range(args.subsets)])
    masks.scatter_(1, keeps, 1.0)
    subsets = keeps.repeat_interleave(args.seeds, 0)                      # (J * seeds, n / 2)
    W, _ = train_many(init, X, y, subsets, [100 + i for i in range(len(subsets))], args)
    losses = batched_test_losses(W, Xt, yt).reshape(args.subsets, args.seeds, -1).mean(1)
    actual = (losses - full_loss).double()
    # noise of the ground truth: LDS-style agreement of two halves of the seeds (same subsets)
    half = batched_test_losses(W, Xt, yt).reshape(args.subsets, args.seeds, -1)
    k = args.seeds // 2
    split_rho = [spearmanr(half[:, :k, i].mean(1), half[:, k:, i].mean(1)).statistic for i in range(len(Xt))] \
        if args.seeds >= 2 else [float("nan")]
    retrain_s = time.perf_counter() - t0

    result = {
        "benchmark": "lds_digits_mlp",
        "machine": f"{platform.machine()} CPU container, no GPU, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads (shared with other jobs)",
        "setup": {"n_train": n, "n_test": len(Xt), "subsets": args.subsets, "seeds_per_subset": args.seeds,
                  "subset_fraction": 0.5, "epochs": args.epochs, "lr": args.lr, "momentum": args.momentum,
                  "batch_size": args.batch_size, "checkpoints": args.checkpoints,
                  "dropout_members": args.members, "params": tracin.num_params,
                  "full_model_test_loss": round(float(full_loss.mean()), 4)},
        "ground_truth_seed_split_spearman": round(float(np.nanmean(split_rho)), 4),
        "lds": {k: round(lds(v, masks, actual), 4) for k, v in scores.items()},
        "scoring_seconds": timings,
        "retrain_seconds": round(retrain_s, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
