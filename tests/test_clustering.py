"""TracIn clusters: unit rows equal the similarity, k-means matches a plain loop, agglomerative matches sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.analysis.clustering import Clusters, UnitRows


def _flat_unit_rows(index, train, n: int) -> np.ndarray:
    """u(z) from flat vmap gradients (independent of the stored layout), float64: (n, C*P)."""
    tr = index.tracin
    w = tr.checkpoints.learning_rates / tr.checkpoints.learning_rates.sum()
    X, y = train
    parts = []
    for c in range(len(tr.checkpoints)):
        g = tr.featurizer.grads.per_example(tr.state(c), X[:n], y[:n]).double().cpu()
        parts.append(float(w[c]) ** 0.5 * g / g.norm(dim=1, keepdim=True))
    return torch.cat(parts, 1).numpy()


def _reference_kmeans(U: np.ndarray, init: list[int], iters: int = 100) -> np.ndarray:
    """Spherical k-means written as a plain loop over examples."""
    centers = [U[i] / np.linalg.norm(U[i]) for i in init]
    labels = None
    for _ in range(iters):
        new = []
        for u in U:
            new.append(int(np.argmax([float(u @ m) for m in centers])))
        new = np.array(new)
        if labels is not None and (new == labels).all():
            break
        labels = new
        for k in range(len(centers)):
            s = U[labels == k].sum(0)
            centers[k] = s / np.linalg.norm(s)
    return labels


def _same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.fixture(scope="module")
def index(cnn_index):
    return cnn_index


def test_unit_rows_dot_is_similarity(index, small_digits):
    rows = UnitRows(index, block_size=64, cache_bytes=0)
    u = torch.cat([b for _, b in rows.blocks()]).double()
    feats = torch.stack([index.features(c)[:30] for c in range(index.store.n_checkpoints)])
    sim = index.similarity(features=feats)
    assert torch.allclose(u[:30] @ u.T, sim.double(), atol=1e-4)
    assert torch.allclose(u.norm(dim=1), torch.ones(len(u), dtype=torch.float64), atol=1e-4)
    U = _flat_unit_rows(index, small_digits.train, 40)
    assert np.allclose(u[:40].numpy() @ u[:40].numpy().T, U @ U.T, atol=1e-4)


def test_kmeans_matches_plain_loop(index):
    n = index.n_train
    init = [0, 7, 50, 120, 200, 260]
    ours = index.cluster(6, init=torch.tensor(init), block_size=37, cache_bytes=0)
    U = torch.cat([b for _, b in UnitRows(index).blocks()]).double().numpy()
    ref = _reference_kmeans(U, init)
    assert len(ours.labels) == n and _same_partition(ours.labels.numpy(), ref)


def test_kmeans_invariants_and_determinism(index, small_digits):
    a = index.cluster(10, seed=3)
    b = index.cluster(10, seed=3, block_size=50, cache_bytes=0)
    assert isinstance(a, Clusters) and a.method == "kmeans"
    assert torch.equal(a.labels, b.labels)
    K = len(a.sizes)
    assert a.labels.dtype == torch.int64 and a.sizes.dtype == torch.int64
    assert int(a.sizes.sum()) == index.n_train and bool((a.sizes[:-1] >= a.sizes[1:]).all())
    assert torch.equal(a.sizes, torch.bincount(a.labels, minlength=K))
    # fixed point: each example's cluster is its most similar centre; centres are normalized means
    rows = UnitRows(index)
    dots = rows.dots(a.centers.to(rows.dtype)).cpu()
    assert bool((dots.max(1).values - dots.gather(1, a.labels.unsqueeze(1)).squeeze(1) <= 1e-5).all())
    for k in range(K):
        m = a.members(k)
        assert len(m) == int(a.sizes[k]) and bool((a.labels[m] == k).all())
        assert bool((a.centrality[m][:-1] >= a.centrality[m][1:]).all())
        assert torch.equal(a.representatives[k], m[:5])
    # gradient clusters of a trained classifier are label-coherent: purity well above chance (0.1)
    y = small_digits.train[1]
    purity = sum(int(torch.bincount(y[a.labels == k]).max()) for k in range(K)) / len(y)
    assert purity > 0.5


def test_agglomerative_matches_sklearn(index):
    from sklearn.cluster import AgglomerativeClustering

    ours = index.cluster(5, method="agglomerative", n_representatives=3)
    U = torch.cat([b for _, b in UnitRows(index).blocks()]).double().numpy()
    D = np.clip(1 - U @ U.T, 0, None)
    np.fill_diagonal(D, 0)
    ref = AgglomerativeClustering(n_clusters=5, metric="precomputed", linkage="average").fit_predict(D)
    assert _same_partition(ours.labels.numpy(), ref)
    assert all(len(r) <= 3 for r in ours.representatives) and ours.method == "agglomerative"


def test_projected_index_and_weights(cnn_run, small_digits):
    model, ckpts = cnn_run
    idx = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=64).index(small_digits.train, progress=False)
    res = idx.cluster(4, weights=torch.tensor([0.0, 0.0, 0.0, 1.0]))
    rows = UnitRows(idx, weights=torch.tensor([0.0, 0.0, 0.0, 1.0]))
    assert rows.dim == 64 and res.centers.shape == (len(res.sizes), 64)


def test_bad_input(index):
    with pytest.raises(te.TracInError, match="n_clusters"):
        index.cluster(0)
    with pytest.raises(te.TracInError, match="method"):
        index.cluster(3, method="dbscan")
    with pytest.raises(te.TracInError, match="max_n"):
        index.cluster(3, method="agglomerative", max_n=10)
    with pytest.raises(te.TracInError, match="weights"):
        index.cluster(3, weights=torch.tensor([-1.0, 1, 1, 1]))
    with pytest.raises(te.TracInError, match="does not exist"):
        index.cluster(3).members(7)
