"""Influence neighbours vs embedding neighbours: how often each view's top k share the test label.

Example:
    >>> views = view_neighbors(index, train_data, test_data, k=10)    # dict name -> Neighbors (m, k)
    >>> compare_views(index, train_data, test_data, k=10)             # dict name -> mean agreement
    {'influence proponents': 0.97, 'influence opponents': 0.05, 'embedding neighbours': 0.95, ...}

label_agreement(z') = |{z in top_k(z') : y(z) = y(z')}| / k, averaged over test examples.
Views: influence proponents / opponents (TracInCP, index.top_k), renormalized proponents
(ReTrac R = sum_c eta_c <g_c(z'), g_c(z)> / |g_c(z)|, outliers.renormalized_top_k), similarity
proponents (lr-weighted mean cosine, index.similarity) and embedding neighbours (cosine of the
penultimate-layer inputs at the last checkpoint, embeddings.nearest_neighbors). A good proponent
list shares the label; opponents are "similar but another class", which embeddings cannot separate.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import as_source
from .embeddings import embed, nearest_neighbors
from ..errors import TracInError
from .outliers import renormalized_top_k
from ..store.topk import Neighbors, streaming_top_k



def label_agreement(indices: torch.Tensor, train_labels: torch.Tensor, test_labels: torch.Tensor) -> torch.Tensor:
    """Fraction of each row's neighbours whose label equals the test label: Tensor (m,) float64.

    indices: (m, k) training indices; train_labels (n,); test_labels (m,).
    """
    indices = torch.as_tensor(indices)
    if indices.dim() != 2 or indices.shape[0] != len(test_labels):
        raise TracInError(f"indices must be (n_test, k) with n_test={len(test_labels)}, got {tuple(indices.shape)}.")
    train_labels, test_labels = torch.as_tensor(train_labels).cpu(), torch.as_tensor(test_labels).cpu()
    return (train_labels[indices.cpu()] == test_labels.unsqueeze(1)).double().mean(1)


def view_neighbors(index: Any, train_data: Any, test_data: Any, k: int = 10) -> dict[str, Neighbors]:
    """Top-k training neighbours of every test example in each view: dict name -> Neighbors (m, k)."""
    tracin = index.tracin
    feats = tracin.features(test_data)
    top = index.top_k(features=feats, k=k)
    sim = index.similarity(features=feats)
    e_train, e_test = embed(tracin, train_data), embed(tracin, test_data)
    return {
        "influence proponents": top.proponents,
        "influence opponents": top.opponents,
        "renormalized proponents": renormalized_top_k(index, features=feats, k=k).proponents,
        "similarity proponents": streaming_top_k([(0, sim)], k).proponents,
        "embedding neighbours": nearest_neighbors(e_train, e_test, k),
    }


def compare_views(index: Any, train_data: Any, test_data: Any, k: int = 10) -> dict[str, float]:
    """Mean label agreement of each view's top k (see the module docstring): dict name -> float."""
    y_train, y_test = as_source(train_data).labels(), as_source(test_data).labels()
    if y_train is None or y_test is None:
        raise TracInError("compare_views needs labelled train_data and test_data (pairs (X, y)).")
    return {name: float(label_agreement(nb.indices, y_train, y_test).mean())
            for name, nb in view_neighbors(index, train_data, test_data, k).items()}
