"""The one place where the widgets reach past the index interface into the engine.

The galleries talk to an index only through its declared interface (n_train, learning_rates, tracin,
test_features, influence / influence_per_checkpoint / top_k / similarity with features=, self_influence,
self_influence_per_checkpoint, outliers, cluster). Everything else they need is a function here, so
when the engine's modules move, only this file follows them.

Importing this module imports neither torch nor the engine (the IPython extension reads RESULT_TYPES
at `%load_ext` time); each function imports what it needs.

Example:
    >>> from tracin_widgets import _engine as eng
    >>> eng.train_losses(index)            # Tensor (C, n_train) float64 (NaN where not recorded) or None
    >>> eng.per_checkpoint_row(index, feats, 12)   # Tensor (C,) float64: eta_c <g_c(query), g_c(z_12)>
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# engine result types the extension formats, by (module, class name), so nothing is imported until one is shown
RESULT_TYPES = {
    ("tracin_engine.store.topk", "TopK"): "topk",
    ("tracin_engine.store.topk", "Neighbors"): "neighbors",
    ("tracin_engine.methods.index", "GradientIndex"): "index",
    ("tracin_engine.analysis.clustering", "Clusters"): "clusters",
}


def __getattr__(name: str) -> Any:
    if name == "TracInError":          # `from ._engine import TracInError`, imported on first use
        from tracin_engine.errors import TracInError

        return TracInError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_source(data: Any, batch_fn: Any = None):
    """The engine's DataSource for what users pass as data (tracin_engine.data.as_source)."""
    from tracin_engine.data import as_source as _as_source

    return _as_source(data, batch_fn)


def store_path(index: Any) -> Path | None:
    """Folder the index's features live in (a disk store), else None (memory, or an index without a store)."""
    store = getattr(index, "store", None)
    path = getattr(store, "path", None)
    if path is None:
        members = getattr(index, "members", None)        # EnsembleIndex: its first member's folder's parent
        if members:
            first = store_path(members[0][1])
            return first.parent if first is not None else None
        return None
    return Path(path)


def train_losses(index: Any) -> torch.Tensor | None:
    """l(w_c, z) recorded while featurizing: Tensor (C, n_train) float64, NaN where not recorded; None if absent."""
    store = getattr(index, "store", None)
    losses = getattr(store, "losses", None)
    import torch

    if losses is None or bool(torch.isnan(losses).all()):
        return None
    return losses.double()


def has_output_norms(index: Any) -> bool:
    """Whether the index can rank by output-space self-influence (index.outliers(space="output"))."""
    if not getattr(index, "records_outputs", False) or getattr(index, "store", None) is None:
        return False
    from tracin_engine.analysis.outliers import has_output_norms as _has

    return _has(index)


def can_rerank(index: Any) -> bool:
    """Whether index.top_k takes rerank= and changes anything: a GradientIndex with a projection (proj_dim)."""
    from tracin_engine.methods.index import GradientIndex

    return isinstance(index, GradientIndex) and bool(index.tracin.proj_dim)


def per_checkpoint_row(index: Any, features: torch.Tensor, i: int) -> torch.Tensor:
    """Terms eta_c <g_c(query), g_c(z_i)> for one training example i: Tensor (C,) float64, summing to S(query, z_i).

    features: (C, 1, dim) from index.test_features. With a stored feature matrix this reads one row per
    checkpoint (fast at any n_train); otherwise it falls back to index.influence_per_checkpoint.
    """
    import torch

    layout = getattr(index, "layout", None)
    if layout is not None and hasattr(index, "features") and hasattr(index, "store"):
        t = features.double()
        terms = [lr * layout.dots(t[c], index.features(c)[i:i + 1].to(t.device).double())[0, 0]
                 for c, lr in enumerate(index.learning_rates.tolist())]
        return torch.stack(terms).cpu()
    return index.influence_per_checkpoint(features=features)[:, 0, int(i)].double().cpu()


def embed(index: Any, data: Any) -> torch.Tensor:
    """Penultimate-layer embeddings at the last checkpoint: Tensor (n, d) (tracin_engine.analysis.embeddings.embed)."""
    from tracin_engine.analysis.embeddings import embed as _embed

    return _embed(index.tracin, data)


def nearest_neighbors(train_emb: torch.Tensor, query_emb: torch.Tensor, k: int):
    """k most cosine-similar training embeddings per query row: Neighbors (m, k), best first."""
    from tracin_engine.analysis.embeddings import nearest_neighbors as _nn

    return _nn(train_emb, query_emb, k)


def model_outputs(index: Any, data: Any, batch_size: int = 512) -> torch.Tensor:
    """Model outputs at the last checkpoint, eval mode, no gradients: Tensor (n, ...) float on the CPU."""
    return index.tracin.outputs(data, batch_size=batch_size)


def example_losses(index: Any, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example loss of outputs (n, ...) against labels (n, ...): Tensor (n,) float64, with the index's loss_fn.

    Integer class labels with 2-D outputs use cross-entropy (what F.cross_entropy averages); anything
    else calls loss_fn on one example at a time.
    """
    import torch

    if outputs.dim() == 2 and labels.dim() == 1 and not labels.is_floating_point():
        return -torch.log_softmax(outputs.double(), 1).gather(1, labels.long().view(-1, 1))[:, 0]
    loss_fn = index.tracin.loss_fn
    if loss_fn is None:
        return torch.full((len(outputs),), float("nan"), dtype=torch.float64)
    return torch.tensor([float(loss_fn(outputs[i:i + 1], labels[i:i + 1])) for i in range(len(outputs))],
                        dtype=torch.float64)
