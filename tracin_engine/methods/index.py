"""GradientIndex: the training set featurized once; queries answered from the stored features.

Example:
    >>> index = tracin.index((X_train, y_train))
    >>> index.influence((X_test, y_test))          # Tensor (n_test, n_train); positive = proponent
    >>> best = index.top_k((X_test, y_test), k=10)  # TopK: .proponents / .opponents (indices, scores)
    >>> index.self_influence()                     # Tensor (n_train,)

Scores follow TracInCP: S(z, z') = sum_c eta_c <g_c(z), g_c(z')>, g_c the (projected) gradient at
checkpoint c, eta_c its learning rate. See scoring.py for the similarity and self-influence formulas.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import BatchFn
from ..errors import TracInError
from ..gradients.per_example import Target
from ..store.scoring import full_scores, score_blocks, self_influence
from ..store.feature_store import FeatureStore
from ..store.topk import TopK, streaming_top_k

if TYPE_CHECKING:
    from .tracin import TracIn


class GradientIndex:
    """Stored training features (one FeatureStore) plus the TracIn that made them (for queries)."""

    records_outputs = True  # featurization stores ||dl/df||^2 and losses per row (index.outliers(space="output"))

    def __init__(self, tracin: "TracIn", store: FeatureStore):
        if not store.complete:
            missing = int((~store.done_mask).sum())
            raise TracInError(f"the index is incomplete ({missing} rows not featurized); run "
                              "tracin.index(data, store=path) again to resume.")
        self.tracin = tracin
        self.store = store

    def __repr__(self) -> str:
        where = f"'{self.store.path}'" if self.store.path else "memory"
        return (f"GradientIndex(n_train={self.n_train}, checkpoints={self.store.n_checkpoints}, "
                f"dim={self.store.dim}, proj_dim={self.tracin.proj_dim}, store={where})")

    # -- facts ------------------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return self.store.n

    @property
    def learning_rates(self) -> torch.Tensor:
        """Tensor (C,) float64: eta_c, the weight of checkpoint c."""
        return self.tracin.checkpoints.learning_rates

    @property
    def layout(self):
        """How a stored row represents a gradient (tracin_engine.store.layout.Layout)."""
        return self.tracin.featurizer.layout

    def features(self, c: int) -> torch.Tensor:
        """Stored training features of checkpoint c: Tensor (n_train, dim)."""
        return self.store.features(c)

    def test_features(self, test_data: Any, target: Target = "loss", batch_fn: BatchFn | None = None
                      ) -> torch.Tensor:
        """Query-side features of test examples, as every scoring method takes them: (C, m, dim).

        Compute once and pass as features= to query repeatedly (widgets do).
        """
        return self.tracin.features(test_data, target=target, batch_fn=batch_fn)

    def query_features(self, test_data: Any = None, target: Target = "loss", batch_fn: BatchFn | None = None,
                       features: torch.Tensor | None = None) -> torch.Tensor:
        """`features` when given, else test_features(test_data, target, batch_fn): Tensor (C, m, dim)."""
        if features is not None:
            return features
        if test_data is None:
            raise TracInError("pass test_data (or features= from index.test_features(...)).")
        return self.test_features(test_data, target, batch_fn)

    # -- queries ----------------------------------------------------------------------------------
    def influence(self, test_data: Any = None, target: Target = "loss", batch_fn: BatchFn | None = None,
                  *, features: torch.Tensor | None = None) -> torch.Tensor:
        """TracInCP scores: Tensor (n_test, n_train); positive = proponent (lowered the test loss)."""
        t = self.query_features(test_data, target, batch_fn, features)
        return full_scores(t, self.store, self.learning_rates, self.layout)

    def influence_per_checkpoint(self, test_data: Any = None, target: Target = "loss",
                                 batch_fn: BatchFn | None = None, *,
                                 features: torch.Tensor | None = None) -> torch.Tensor:
        """Per-checkpoint terms eta_c <g_c(z), g_c(z')>: Tensor (C, n_test, n_train); sums to influence."""
        t = self.query_features(test_data, target, batch_fn, features)
        return full_scores(t, self.store, self.learning_rates, self.layout, per_checkpoint=True)

    def top_k(self, test_data: Any = None, k: int = 10, target: Target = "loss",
              batch_fn: BatchFn | None = None, *, features: torch.Tensor | None = None,
              block_size: int | None = None, test_chunk: int = 1024) -> TopK:
        """k proponents (highest scores) and k opponents (lowest) per test example, streamed over blocks.

        Returns TopK: .proponents.indices / .scores (n_test, k), best first; .opponents likewise,
        most negative first. Memory stays bounded: test examples go in chunks of `test_chunk`,
        training rows in blocks of `block_size` (default: about 256 MB of scores).
        """
        if k < 1:
            raise TracInError(f"k must be at least 1, got {k}.")
        t = self.query_features(test_data, target, batch_fn, features)
        parts = [streaming_top_k(score_blocks(t[:, s:s + test_chunk], self.store, self.learning_rates,
                                              self.layout, block_size=block_size), k)
                 for s in range(0, t.shape[1], test_chunk)]
        return parts[0] if len(parts) == 1 else TopK.concat(parts)

    def similarity(self, test_data: Any = None, target: Target = "loss", batch_fn: BatchFn | None = None,
                   *, features: torch.Tensor | None = None) -> torch.Tensor:
        """lr-weighted mean cosine of gradients: Tensor (n_test, n_train) in [-1, 1]."""
        t = self.query_features(test_data, target, batch_fn, features)
        w = self.learning_rates / self.learning_rates.sum()
        return full_scores(t, self.store, w, self.layout, normalize=True)

    def self_influence(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """sum_c eta_c ||g_c(z)||^2 for every training example: Tensor (n_train,) float64.

        weights: (C,) to replace the learning rates (e.g. one-hot to look at a single checkpoint).
        """
        return self_influence(self.store, self._weights(weights))

    def self_influence_per_checkpoint(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Terms eta_c ||g_c(z)||^2: Tensor (C, n_train) float64; sums to self_influence()."""
        return self_influence(self.store, self._weights(weights), per_checkpoint=True)

    def _weights(self, weights: torch.Tensor | None) -> torch.Tensor:
        if weights is None:
            return self.learning_rates
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (self.store.n_checkpoints,):
            raise TracInError(f"weights must have one entry per checkpoint ({self.store.n_checkpoints}), "
                              f"got shape {tuple(weights.shape)}.")
        return weights

    def cluster(self, n_clusters: int, **kwargs: Any):
        """TracIn clusters of the training set (see tracin_engine.analysis.clustering.cluster)."""
        from ..analysis.clustering import cluster

        return cluster(self, n_clusters, **kwargs)

    def outliers(self, weights: torch.Tensor | None = None, checkpoints: Any = None,
                 normalize: str = "none", space: str = "output"):
        """Training examples ranked by self-influence: Outliers (.indices, .scores, .per_checkpoint).

        space "output" (default: sum_c eta_c ||dl/df_c(z)||^2, the loss gradient w.r.t. the model
        output, recorded while featurizing) or "parameters" (sum_c eta_c ||g_c(z)||^2 =
        self_influence()); normalize "none", "checkpoint" (each checkpoint over its training mean)
        or "log"; checkpoints=[0] ranks by the first checkpoint only. See tracin_engine/analysis/outliers.py.
        """
        from ..analysis.outliers import rank_outliers

        return rank_outliers(self, weights, checkpoints, normalize, space)

    def renormalized_top_k(self, test_data: Any = None, k: int = 10, target: Target = "loss",
                           batch_fn: BatchFn | None = None, *, features: torch.Tensor | None = None) -> TopK:
        """Proponents / opponents by ReTrac-style scores sum_c eta_c <g_c(z'), g_c(z)> / |g_c(z)|."""
        from ..analysis.outliers import renormalized_top_k

        return renormalized_top_k(self, test_data, k, target, batch_fn, features=features)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the index to folder `path` (memory-mapped on reopen). Returns the path."""
        path = Path(path)
        if self.store.path is not None and Path(self.store.path).resolve() == path.resolve():
            return path
        if path.exists():
            shutil.rmtree(path)
        self.store.copy_to(path, self.tracin.metadata())
        return path

    @classmethod
    def load(cls, path: str | Path, tracin: "TracIn") -> "GradientIndex":
        """Reopen a saved index; the metadata must match `tracin` (model, checkpoints, proj_dim, ...)."""
        store = FeatureStore.load(path)
        tracin.featurizer.adopt(store.metadata.get("per_example", "vmap"), store.metadata.get("layout"))
        FeatureStore.open_or_create(path, store.n, store.n_checkpoints, store.dim, store.dtype,
                                    tracin.metadata())  # raises on any mismatch
        return cls(tracin, store)
