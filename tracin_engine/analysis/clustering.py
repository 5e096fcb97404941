"""TracIn clusters: training examples grouped by gradient direction (distance = 1 - TracIn similarity).

Example:
    >>> result = index.cluster(8)                       # spherical k-means, k-means++ seeding, seed 0
    >>> result.labels                                   # LongTensor (n_train,), clusters largest first
    >>> result.members(0)[:5]                           # the 5 most central examples of cluster 0
    >>> index.cluster(8, method="agglomerative")        # average linkage on 1 - similarity (small n)

The TracIn similarity of z and z' is the lr-weighted mean of per-checkpoint cosines,
    sim(z, z') = sum_c w_c <g_c(z), g_c(z')> / (|g_c(z)| |g_c(z')|),   w_c = eta_c / sum eta.
With the unit vector u(z) = concat_c [ sqrt(w_c) g_c(z) / |g_c(z)| ] (length sum_c P_c),
sim(z, z') = <u(z), u(z')> exactly, so spherical k-means on u maximizes sum_z sim(z, centre(z)):
    assign  label(z) = argmax_k <u(z), m_k>,   update  m_k = normalize(sum_{label(z)=k} u(z)).
u is built in blocks of rows from the stored features (Linear "outer" rows are expanded to the
flat gradient of that layer), so no n x n matrix is formed; the features are read through the
index's device_features() (resident on the GPU once, not copied per iteration and per seed);
when n * D numbers of u fit in `cache_bytes` (default: a quarter of the device's free memory) the
rows are kept on the device between iterations. Block sizes come from free memory and every pass
runs under the out-of-memory policy (memory.py: a failed pass halves the block and runs again).
Centrality of z = <u(z), m_k>.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ..errors import TracInError
from ..store.scoring import accum_dtype
from ..memory import Backoff, fits, is_oom, rows_that_fit



@dataclass(frozen=True)
class Clusters:
    """labels (n_train,) int64 in [0, K), clusters numbered largest first; sizes (K,) int64;
    representatives: per cluster up to n_representatives training indices, most central first;
    centers (K, D) unit centres in u-space; centrality (n_train,) = <u(z), centre of its cluster>;
    objective = sum of centralities; method "kmeans" or "agglomerative"."""

    labels: torch.Tensor
    sizes: torch.Tensor
    representatives: list[torch.Tensor]
    centers: torch.Tensor
    centrality: torch.Tensor
    objective: float
    method: str

    def members(self, k: int) -> torch.Tensor:
        """All training indices of cluster k, most central first: LongTensor (sizes[k],)."""
        if not 0 <= k < len(self.sizes):
            raise TracInError(f"cluster {k} does not exist; valid clusters are 0..{len(self.sizes) - 1}.")
        idx = torch.nonzero(self.labels == k).flatten()
        order = torch.argsort(self.centrality[idx], descending=True, stable=True)
        return idx[order]


class UnitRows:
    """u(z) for all training examples, served in row blocks: block(start, stop) -> (b, D) on `device`."""

    def __init__(self, index: Any, weights: torch.Tensor | None = None,
                 device: torch.device | str | None = None, block_size: int | None = None,
                 cache_bytes: int | None = None):
        store = index.store
        w = index.learning_rates if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (store.n_checkpoints,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise TracInError(f"weights must be {store.n_checkpoints} non-negative numbers with a positive sum, "
                              f"got {w.tolist()}.")
        self.store, self.layout = store, index.layout
        self.device = torch.device(device) if device is not None else index.device
        self.features = index.device_features(self.device)  # resident once, reused by every pass
        self.dtype = accum_dtype(store.dtype)
        w = w / w.sum()
        norms = store.sq_norms.sqrt()
        self.scale = torch.where(norms > 0, w.sqrt().unsqueeze(1) / norms.clamp_min(1e-300),
                                 torch.zeros_like(norms)).to(self.device, self.dtype)  # (C, n)
        self.keep = [c for c in range(store.n_checkpoints) if float(w[c]) > 0]
        per_ckpt = sum(s.a_dim for s in self.layout.dense) + sum(s.a_dim * s.g_dim for s in self.layout.outer) \
            + sum(s.a_dim * s.g_dim for s in self.layout.lowrank)
        self.n, self.dim = store.n, per_ckpt * len(self.keep)
        itemsize = 8 if self.dtype == torch.float64 else 4
        self.block_size = block_size or rows_that_fit(3 * itemsize * max(1, self.dim), self.device, maximum=self.n,
                                                      fraction=0.25, cap_bytes=2**28)
        self._cache = None
        nbytes = self.n * self.dim * itemsize
        if nbytes <= cache_bytes if cache_bytes is not None else fits(nbytes, self.device, 0.25):
            try:
                self._cache = torch.cat([b for _, b in self.blocks()])
            except Exception as exc:  # noqa: BLE001 - no cache when it does not fit after all
                if not is_oom(exc):
                    raise

    def _expand(self, f: torch.Tensor) -> torch.Tensor:
        if self.layout.is_dense:
            return f
        parts = [f[:, s.start:s.start + s.a_dim] for s in self.layout.dense]
        for s in self.layout.outer:
            a, g = f[:, s.start:s.start + s.a_dim], f[:, s.start + s.a_dim:s.start + s.size]
            parts.append((g.unsqueeze(2) * a.unsqueeze(1)).flatten(1))
        for s in self.layout.lowrank:                   # sum_t g_t a_t^T, flattened like an outer segment
            a, g = s.parts(f)
            parts.append(torch.bmm(g.transpose(1, 2), a).flatten(1))
        return torch.cat(parts, 1)

    def block(self, start: int, stop: int) -> torch.Tensor:
        if getattr(self, "_cache", None) is not None:
            return self._cache[start:stop]
        parts = []
        for c in self.keep:
            f = self.features.block(c, start, stop).to(self.device).to(self.dtype)
            parts.append(self._expand(f) * self.scale[c, start:stop].unsqueeze(1))
        return torch.cat(parts, 1)

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, self.n, self.block_size):
            yield start, self.block(start, min(start + self.block_size, self.n))

    def run_pass(self, fn):
        """fn() over all blocks, under the out-of-memory policy: on OOM the block size halves (for
        good) and the whole pass runs again (passes are pure). Returns fn's result."""
        size = Backoff(self.block_size, self.device, what="clustering block", advice="pass block_size= smaller.")

        def step(b: int):
            self.block_size = b
            return fn()

        return size.run(step)

    def dots(self, centers: torch.Tensor) -> torch.Tensor:
        """<u(z), centers_k> for every z: (n, K)."""
        return self.run_pass(lambda: torch.cat([b @ centers.T for _, b in self.blocks()]))


def _kmeans_pp(rows: UnitRows, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeds: next seed drawn with probability proportional to 1 - max cosine to the seeds
    (= squared Euclidean distance / 2 on unit vectors)."""
    first = int(torch.randint(rows.n, (1,), generator=gen))
    chosen = [first]
    best = rows.dots(rows.block(first, first + 1)).squeeze(1).cpu().double()
    for _ in range(1, k):
        d = (1 - best).clamp_min(0)
        d[chosen] = 0
        nxt = int(torch.multinomial(d, 1, generator=gen)) if float(d.sum()) > 0 else \
            int(next(i for i in range(rows.n) if i not in chosen))
        chosen.append(nxt)
        best = torch.maximum(best, rows.dots(rows.block(nxt, nxt + 1)).squeeze(1).cpu().double())
    return torch.tensor(chosen, dtype=torch.int64)


def _assign(rows: UnitRows, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass: labels (n,), best cosine (n,), per-cluster sums of u (K, D)."""
    def one_pass() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sums = torch.zeros_like(centers)
        labels, sims = [], []
        for _, b in rows.blocks():
            s, lab = (b @ centers.T).max(1)
            sums.index_add_(0, lab, b)
            labels.append(lab)
            sims.append(s)
        return torch.cat(labels).cpu(), torch.cat(sims).cpu().double(), sums

    return rows.run_pass(one_pass)


def spherical_kmeans(rows: UnitRows, k: int, seed: int = 0, max_iter: int = 100,
                     init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd iterations until the labels stop changing: (labels (n,), centers (K, D), centrality (n,)).

    init: LongTensor (K,) of training indices used as the first centres (default: k-means++ with `seed`).
    An empty cluster is re-seeded with the example farthest from its centre.
    """
    gen = torch.Generator().manual_seed(seed)
    seeds = _kmeans_pp(rows, k, gen) if init is None else torch.as_tensor(init, dtype=torch.int64)
    centers = torch.cat([rows.block(int(i), int(i) + 1) for i in seeds])
    centers = torch.nn.functional.normalize(centers, dim=1)
    prev = None
    for _ in range(max_iter):
        labels, sims, sums = _assign(rows, centers)
        if prev is not None and torch.equal(labels, prev):
            break
        prev = labels
        counts = torch.bincount(labels, minlength=k)
        far = iter(torch.argsort(sims).tolist())
        for j in torch.nonzero(counts == 0).flatten().tolist():
            i = next(far)
            sums[j] = rows.block(i, i + 1)[0]
        centers = torch.nn.functional.normalize(sums, dim=1)
    else:  # max_iter reached: labels of the final centres
        labels, sims, _ = _assign(rows, centers)
    return labels, centers, sims


def _agglomerative(rows: UnitRows, k: int, linkage: str, max_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if rows.n > max_n:
        raise TracInError(f"agglomerative clustering builds an n x n matrix; n_train={rows.n} is above "
                          f"max_n={max_n}. Use method='kmeans' (blocked) or pass a larger max_n.")
    from scipy.cluster.hierarchy import fcluster, linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    u = torch.cat([b for _, b in rows.blocks()])
    dist = (1 - u @ u.T).clamp_min(0).double().cpu()
    dist.fill_diagonal_(0)
    dist = (dist + dist.T) / 2
    if linkage == "ward":
        dist = (2 * dist).sqrt()  # Euclidean distance between unit vectors
    tree = scipy_linkage(squareform(dist.numpy(), checks=False), method=linkage)
    labels = torch.as_tensor(fcluster(tree, k, criterion="maxclust") - 1, dtype=torch.int64)
    sums = torch.zeros(int(labels.max()) + 1, rows.dim, dtype=u.dtype, device=u.device)
    sums.index_add_(0, labels.to(u.device), u)
    return labels, torch.nn.functional.normalize(sums, dim=1)


def cluster(index: Any, n_clusters: int, method: str = "kmeans", n_representatives: int = 5,
            seed: int = 0, weights: torch.Tensor | None = None, device: torch.device | str | None = None,
            max_iter: int = 100, linkage: str = "average", max_n: int = 5000, block_size: int | None = None,
            cache_bytes: int | None = None, init: torch.Tensor | None = None) -> Clusters:
    """Cluster the training set of `index` by TracIn similarity. Returns Clusters.

    method: "kmeans" (spherical k-means, blocked, any n) or "agglomerative" (scipy hierarchical
    clustering of 1 - sim with `linkage` "average" / "complete" / "single" / "ward"; needs n <= max_n).
    weights: (C,) non-negative checkpoint weights replacing the learning rates in w_c.
    device: where the products run (default: the index's device, CUDA when present).
    """
    n = index.n_train
    if not isinstance(n_clusters, int) or not 1 <= n_clusters <= n:
        raise TracInError(f"n_clusters must be an integer between 1 and n_train={n}, got {n_clusters!r}.")
    if method not in ("kmeans", "agglomerative"):
        raise TracInError(f"method must be 'kmeans' or 'agglomerative', got {method!r}.")
    if linkage not in ("average", "complete", "single", "ward"):
        raise TracInError(f"linkage must be 'average', 'complete', 'single' or 'ward', got {linkage!r}.")
    if n_representatives < 1:
        raise TracInError(f"n_representatives must be at least 1, got {n_representatives}.")
    rows = UnitRows(index, weights, device, block_size, cache_bytes)
    if method == "kmeans":
        labels, centers, _ = spherical_kmeans(rows, n_clusters, seed, max_iter, init)
    else:
        labels, centers = _agglomerative(rows, n_clusters, linkage, max_n)
    return _finish(rows, labels, centers, n_representatives, method)


def _finish(rows: UnitRows, labels: torch.Tensor, centers: torch.Tensor, n_rep: int, method: str) -> Clusters:
    """Drop empty clusters, number them largest first (ties: smallest member index), rank members."""
    k = centers.shape[0]
    sizes = torch.bincount(labels, minlength=k)
    first = torch.full((k,), rows.n, dtype=torch.int64).scatter_reduce(0, labels, torch.arange(rows.n), "amin")
    order = sorted((j for j in range(k) if sizes[j] > 0), key=lambda j: (-int(sizes[j]), int(first[j])))
    remap = torch.full((k,), -1, dtype=torch.int64)
    remap[order] = torch.arange(len(order))
    labels = remap[labels]
    centers = centers[torch.tensor(order, device=centers.device)]
    dots = rows.dots(centers).cpu().double()
    centrality = dots.gather(1, labels.unsqueeze(1)).squeeze(1)
    result = Clusters(labels, torch.bincount(labels, minlength=len(order)), [], centers.cpu(), centrality,
                      float(centrality.sum()), method)
    result.representatives.extend(result.members(j)[:n_rep] for j in range(len(order)))
    return result
