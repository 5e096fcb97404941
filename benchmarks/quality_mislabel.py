"""Mislabel detection: TracIn self-influence vs final-model loss vs cleanlab, in one run. Prints JSON.

    .venv/bin/python benchmarks/quality_mislabel.py [--quick] > results.json

10% of the training labels are flipped to another class (seeded). Each model is trained with plain
SGD (tracin_engine.examples.train) saving checkpoints evenly over training, then every training
example is ranked by:
  - tracin self-influence (rank_outliers): output space (the default, sum_c eta_c ||dl/df_c||^2),
    parameter space (the paper's sum_c eta_c ||g_c||^2; also normalize="checkpoint"), first
    checkpoint only, last checkpoint only, last layer only;
  - reference: the loss trajectory sum_c eta_c l_c(z) recorded while featurizing (an
    area-under-the-loss-curve ranking, like AUM; not TracIn, shown for comparison);
  - final loss: the final model's cross-entropy on the (noisy) label;
  - cleanlab: cleanlab.filter.find_label_issues on out-of-fold predicted probabilities (5-fold,
    the same model and schedule trained on each 4/5); flagged examples first (lowest self-confidence
    first), then the rest by self-confidence.
Metrics: fraction of the flipped examples found in the top 5 / 10 / 20 % of the ranking, and ROC AUC.
Regimes: "early" (stopped before the flipped labels are fitted) and "memorize" (trained until every
training label, flipped ones included, is fitted); the tabular MLP also with 20 checkpoints. Every
regime runs for each seed of --seeds (the seed picks the flipped labels, the initialization and the
batch order, and the cleanlab folds); the report has each seed and the mean. Models: DigitsCNN on sklearn digits (1500 train),
MLP on sklearn breast_cancer (569, standardized); task "digits_mlp" (not in the default --tasks):
a 2-hidden-layer MLP (128 units) memorizing the digits, a second architecture on the same data.
Task "ideal": a clean DigitsCNN run with TracInIdealRecorder (tracin_engine.methods.ideal) on 60 test
examples; Pearson correlation of TracInCP (5 checkpoints) with TracInIdeal, and the label agreement
of top-10 neighbours in each view (tracin_engine.analysis.neighbors_quality) on all 297 test examples.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.examples import MLP, DigitsCNN, load_digits_split, train
from tracin_engine.analysis.outliers import rank_outliers

FRACTIONS = (0.05, 0.10, 0.20)


def flip_labels(y: torch.Tensor, n_classes: int, fraction: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[: int(round(fraction * len(y)))]
    noisy = y.clone()
    noisy[idx] = (y[idx] + torch.randint(1, n_classes, (len(idx),), generator=g)) % n_classes
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[idx] = True
    return noisy, mask


def metrics(scores: torch.Tensor, flipped: torch.Tensor) -> dict:
    from sklearn.metrics import roc_auc_score

    order = torch.argsort(scores.double(), descending=True, stable=True)
    out = {f"top{int(f * 100)}": round(float(flipped[order[: math.ceil(f * len(scores))]].sum()) / int(flipped.sum()), 4)
           for f in FRACTIONS}
    out["auc"] = round(float(roc_auc_score(flipped.numpy(), scores.double().numpy())), 4)
    return out


def fit(make, data, cfg, seed=0):
    torch.manual_seed(seed)
    model = make()
    run = tempfile.mkdtemp(prefix="qm_")
    train(model, data, run, epochs=cfg["epochs"], n_checkpoints=cfg["n_checkpoints"], lr=cfg["lr"],
          momentum=cfg["momentum"], batch_size=cfg["batch_size"], seed=seed)
    return model, te.Checkpoints.from_dir(run)


def out_of_fold_probs(make, X, y, cfg, folds=5, seed=0):
    from sklearn.model_selection import StratifiedKFold

    probs = torch.zeros(len(y), int(y.max()) + 1)
    for k, (tr, te_) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y)):
        tr, te_ = torch.as_tensor(tr), torch.as_tensor(te_)
        model, _ = fit(make, (X[tr], y[tr]), cfg, seed=100 * (seed + 1) + k)
        with torch.no_grad():
            probs[te_] = F.softmax(model(X[te_]), 1)
    return probs


def cleanlab_scores(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    p, lab = probs.double().numpy(), labels.numpy()
    flagged = find_label_issues(lab, p)
    quality = get_label_quality_scores(lab, p, method="self_confidence")
    return torch.as_tensor(flagged.astype(np.float64) + (1 - quality))


def run_regime(make, X, y_noisy, flipped, cfg, seed: int = 0) -> dict:
    t0 = time.time()
    model, ckpts = fit(make, (X, y_noisy), cfg, seed=seed)
    with torch.no_grad():
        out = model(X)
    pred = out.argmax(1)
    train_s = time.time() - t0
    t0 = time.time()
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    index = tracin.index((X, y_noisy), progress=False)
    last = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, layers="last").index((X, y_noisy), progress=False)
    C = len(ckpts)
    rankings = {
        "tracin self-influence, output space (default)": rank_outliers(index).scores,
        "tracin self-influence, parameter space (the paper)": rank_outliers(index, space="parameters").scores,
        "tracin parameter space, normalize=checkpoint": rank_outliers(index, space="parameters",
                                                                      normalize="checkpoint").scores,
        "tracin output space, first checkpoint only": rank_outliers(index, checkpoints=[0]).scores,
        "tracin parameter space, first checkpoint only": rank_outliers(index, checkpoints=[0],
                                                                       space="parameters").scores,
        "tracin parameter space, last checkpoint only": rank_outliers(index, checkpoints=[C - 1],
                                                                      space="parameters").scores,
        "tracin parameter space, last layer only": rank_outliers(last, space="parameters").scores,
        "reference: loss trajectory sum_c eta_c l_c(z)": (index.learning_rates.unsqueeze(1)
                                                          * index.store.losses).sum(0),
    }
    tracin_s = time.time() - t0
    t0 = time.time()
    rankings["baseline final loss"] = F.cross_entropy(out, y_noisy, reduction="none").double()
    probs = out_of_fold_probs(make, X, y_noisy, cfg, seed=seed)
    rankings["baseline cleanlab find_label_issues (5-fold out-of-fold)"] = cleanlab_scores(probs, y_noisy)
    base_s = time.time() - t0
    return {
        "seed": seed,
        "final model fits: clean labels": round(float((pred[~flipped] == y_noisy[~flipped]).float().mean()), 4),
        "final model fits: flipped labels": round(float((pred[flipped] == y_noisy[flipped]).float().mean()), 4),
        "checkpoint steps": [c.step for c in ckpts],
        "results": {name: metrics(s, flipped) for name, s in rankings.items()},
        "seconds": {"train": round(train_s, 1), "tracin (index + rankings)": round(tracin_s, 1),
                    "cleanlab 5-fold training": round(base_s, 1)},
    }


def mean_over_seeds(runs: list[dict]) -> dict:
    """Per ranking and metric, the mean over seeds (rounded)."""
    names = runs[0]["results"]
    return {name: {m: round(float(np.mean([r["results"][name][m] for r in runs])), 4) for m in runs[0]["results"][name]}
            for name in names}


def digits_task():
    d = load_digits_split(seed=0)
    return "digits DigitsCNN", (lambda: DigitsCNN()), d.train[0], d.train[1], 10, {
        "early": dict(epochs=10, lr=0.1, momentum=0.0, batch_size=32, n_checkpoints=6),
        "memorize": dict(epochs=100, lr=0.02, momentum=0.9, batch_size=32, n_checkpoints=6)}


def tabular_task():
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    X = torch.tensor((d.data - d.data.mean(0)) / d.data.std(0), dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    return "breast_cancer MLP", (lambda: MLP(30, 2, hidden=32)), X, y, 2, {
        "early": dict(epochs=5, lr=0.05, momentum=0.0, batch_size=32, n_checkpoints=5),
        "memorize": dict(epochs=400, lr=0.02, momentum=0.9, batch_size=32, n_checkpoints=5),
        "memorize, 20 checkpoints": dict(epochs=400, lr=0.02, momentum=0.9, batch_size=32, n_checkpoints=20)}


def digits_mlp_task():
    d = load_digits_split(seed=0)
    return "digits MLP", (lambda: MLP(64, 10, hidden=128)), d.train[0], d.train[1], 10, {
        "memorize": dict(epochs=150, lr=0.02, momentum=0.9, batch_size=32, n_checkpoints=6)}


def ideal_task(n_test: int = 60, epochs: int = 10, n_checkpoints: int = 5, lr: float = 0.1) -> dict:
    """TracInCP (checkpoints) vs TracInIdeal (every step, exact loss changes) on clean digits."""
    from tracin_engine.checkpoints import CheckpointRecorder
    from tracin_engine.methods.ideal import TracInIdealRecorder
    from tracin_engine.analysis.neighbors_quality import compare_views

    t0 = time.time()
    d = load_digits_split(seed=0)
    (X, y), (Xt, yt) = d.train, (d.test[0][:n_test], d.test[1][:n_test])
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = TracInIdealRecorder(model, F.cross_entropy, (Xt, yt), n_train=len(X))
    run = tempfile.mkdtemp(prefix="qm_ideal_")
    ckrec = CheckpointRecorder(run)
    g = torch.Generator().manual_seed(0)
    total = epochs * math.ceil(len(X) / 32)
    save_at = {round(total * (i + 1) / n_checkpoints) for i in range(n_checkpoints)}
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for s in range(0, len(X), 32):
            idx = perm[s:s + 32]
            model.train()
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            with rec.step(idx, X[idx], y[idx], lr=lr):
                opt.step()
            step += 1
            if step in save_at:
                ckrec.save(model, opt, step, batch_size=32)
    train_s = time.time() - t0
    index = te.TracIn(model, te.Checkpoints.from_dir(run), loss_fn=F.cross_entropy).index((X, y), progress=False)
    cp = index.influence((Xt, yt)).double()

    def pearson(a, b):
        return round(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]), 4)

    def spearman_rows(a, b):
        from scipy.stats import spearmanr

        return round(float(np.mean([spearmanr(a[j].numpy(), b[j].numpy())[0] for j in range(len(a))])), 4)

    return {
        "setup": f"DigitsCNN, 1500 train / {n_test} test, {epochs} epochs SGD lr {lr} batch 32 ({step} steps), "
                 f"TracInCP over {n_checkpoints} checkpoints",
        "pearson TracInCP vs TracInIdeal (all pairs)": pearson(cp, rec.ideal),
        "pearson first-order TracIn (every step) vs TracInIdeal": pearson(rec.first_order, rec.ideal),
        "pearson TracInCP vs first-order TracIn (every step)": pearson(cp, rec.first_order),
        "mean per-test spearman TracInCP vs TracInIdeal": spearman_rows(cp, rec.ideal),
        "seconds (training with the recorder)": round(train_s, 1),
        "label agreement of top-10 neighbours (all 297 test)": {
            k: round(v, 4) for k, v in compare_views(index, (X, y), d.test, k=10).items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="digits,tabular,ideal")
    ap.add_argument("--seeds", default="0,1,2", help="label-flip and training seeds; results per seed and mean")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    report = {"machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}, no GPU" if not torch.cuda.is_available() else "cuda",
              "flipped fraction": 0.1, "tasks": {}}
    t_all = time.time()
    tasks = {"digits": digits_task, "tabular": tabular_task, "digits_mlp": digits_mlp_task}
    for key in args.tasks.split(","):
        if key == "ideal":
            report["tracin_cp_vs_ideal"] = ideal_task()
            continue
        name, make, X, y, n_classes, regimes = tasks[key]()
        seeds = [int(v) for v in args.seeds.split(",")]
        flips = {seed: flip_labels(y, n_classes, seed=seed) for seed in seeds}
        task = report["tasks"][name] = {"n_train": len(y), "n_flipped": int(flips[seeds[0]][1].sum())}
        for r, cfg in regimes.items():
            runs = [run_regime(make, X, *flips[seed], cfg, seed=seed) for seed in seeds]
            task[r] = {"config": cfg, "mean over seeds": mean_over_seeds(runs), "per seed": runs}
            print(f"done {name} {r}: {round(time.time() - t_all)} s", file=sys.stderr, flush=True)
    report["total seconds"] = round(time.time() - t_all, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
