"""Slow, obviously correct references for tests: explicit loops over checkpoints and examples."""

from __future__ import annotations

import torch

import tracin_engine as te
from tracin_engine.gradients.per_example import GradientComputer


def loop_grads(tracin: te.TracIn, X, y, target="loss") -> list[torch.Tensor]:
    """Per-checkpoint (n, P) gradients from the per-example loop (GradientComputer.reference)."""
    gc: GradientComputer = tracin.featurizer.grads
    preds = tracin.predictions((X,)) if target == "prediction" else None
    out = []
    for c in range(len(tracin.checkpoints)):
        state = gc.prepare(tracin.checkpoints.load(c))
        out.append(gc.reference(state, X, preds if preds is not None else y, target))
    return out


def loop_influence(tracin: te.TracIn, train, test, target="loss") -> torch.Tensor:
    """sum_c eta_c <g_c(z), g_c(z')> by explicit loops: (n_test, n_train)."""
    gtr = loop_grads(tracin, *train)
    gte = loop_grads(tracin, test[0], test[1] if len(test) > 1 else None, target)
    lrs = tracin.checkpoints.learning_rates
    n_test, n_train = gte[0].shape[0], gtr[0].shape[0]
    S = torch.zeros(n_test, n_train, dtype=torch.float64)
    for c, lr in enumerate(lrs.tolist()):
        for i in range(n_test):
            for j in range(n_train):
                S[i, j] += lr * float(gte[c][i].double() @ gtr[c][j].double())
    return S


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))
