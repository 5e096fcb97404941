"""InfluenceIndex: what every index answers, whichever method built it.

Implemented by GradientIndex (TracInCP), SourceIndex (SOURCE) and EnsembleIndex (dropout ensembles);
the widgets and the analysis functions accept anything that implements it.

    >>> index: InfluenceIndex = tracin.index((X_train, y_train))
    >>> feats = index.test_features((X_test, y_test))          # computed once, opaque to callers
    >>> index.top_k(k=10, features=feats).proponents.indices   # (n_test, 10)
    >>> index.influence(features=feats)                        # (n_test, n_train), positive = proponent

Conventions shared by every implementation (checked by tests/test_interface.py on all three):
- Scores S(z', z) are "positive = proponent": the training example z lowered the test loss.
- Query methods take `test_data` (anything tracin_engine.data.as_source accepts) or `features=`, the
  result of `test_features(...)` on the same index (its shape is the index's own business).
- Every returned tensor lives on the CPU, whatever device computed it.
- A question an index cannot answer raises TracInError naming what to do instead, never
  AttributeError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from .analysis.clustering import Clusters
from .analysis.outliers import Outliers
from .store.topk import TopK


@runtime_checkable
class InfluenceIndex(Protocol):
    """The queries every index answers. n = n_train, m = test examples, C = checkpoints (terms)."""

    tracin: Any
    """The TracIn (model, checkpoints, loss) that built the index; `.predictions(data)` gives labels."""

    records_outputs: bool
    """Whether output-space self-influence (outliers(space="output")) is available."""

    @property
    def n_train(self) -> int: ...

    @property
    def n_checkpoints(self) -> int:
        """C: the number of terms of influence_per_checkpoint / self_influence_per_checkpoint."""

    @property
    def learning_rates(self) -> torch.Tensor:
        """Tensor (C,) float64: the weight of each term."""

    def test_features(self, test_data: Any, target: str = "loss", batch_fn: Any = None) -> torch.Tensor:
        """Query-side features, computed once and passed back as features= to every query."""

    def influence(self, test_data: Any = None, target: str = "loss", batch_fn: Any = None, *,
                  features: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor (m, n): scores, positive = proponent."""

    def influence_per_checkpoint(self, test_data: Any = None, target: str = "loss", batch_fn: Any = None, *,
                                 features: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor (C, m, n): per-term scores that sum over the first axis to influence()."""

    def top_k(self, test_data: Any = None, k: int = 10, target: str = "loss", batch_fn: Any = None, *,
              features: torch.Tensor | None = None) -> TopK:
        """k proponents (highest scores) and k opponents (lowest) per test example."""

    def similarity(self, test_data: Any = None, target: str = "loss", batch_fn: Any = None, *,
                   features: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor (m, n) in [-1, 1]: weighted mean cosine of gradients."""

    def self_influence(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor (n,) float64: S(z, z)."""

    def self_influence_per_checkpoint(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor (C, n) float64: terms of self_influence()."""

    def outliers(self, weights: torch.Tensor | None = None, checkpoints: Any = None, normalize: str = "none",
                 space: str = "output") -> Outliers:
        """Training examples ranked by self-influence."""

    def renormalized_top_k(self, test_data: Any = None, k: int = 10, target: str = "loss", batch_fn: Any = None,
                           *, features: torch.Tensor | None = None) -> TopK:
        """Proponents / opponents by ReTrac-style scores (training gradients normalized)."""

    def cluster(self, n_clusters: int, **kwargs: Any) -> Clusters:
        """Clusters of the training set by TracIn similarity."""

    def save(self, path: str | Path) -> Path:
        """Write the index to a folder; reopen with the class's load(path, tracin)."""
