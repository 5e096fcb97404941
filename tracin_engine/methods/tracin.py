"""TracIn: the facade that composes checkpoints, per-example gradients, projection and storage.

Example:
    >>> ckpts = Checkpoints.from_dir("runs/digits")
    >>> tracin = TracIn(model, ckpts, loss_fn=F.cross_entropy)        # exact (proj_dim=None)
    >>> index = tracin.index((X_train, y_train))                       # featurize once
    >>> index.top_k((X_test, y_test), k=10).proponents.indices        # (n_test, 10)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..checkpoints import Checkpoints, state_fingerprint
from ..data import BatchFn, as_source
from ..errors import TracInError
from ..settings import IndexSettings
from ..gradients.featurize import Featurizer, check_finite, featurize
from ..gradients.per_example import GradientComputer, Target
from .index import GradientIndex
from .source import build_source_index
from ..gradients.projection import build_projection
from ..store.feature_store import FeatureStore
from ..store.scoring import accum_dtype


class TracIn:
    """TracInCP over `checkpoints` for `model`.

    loss_fn(output (1, ...), target (1, ...)) -> one value (any reduction; it sees one example).
    layers: None (all trainable parameters), "last", or module names.
    proj_dim: None for exact gradients (dim = P), or an int for a seeded random projection.
    projection: "gaussian" / "rademacher" (dense G R / sqrt(proj_dim) of the flat gradient) or
    "factored" (per-layer P_g^T dW P_a of Linear/Conv2d layers from one batched forward+backward,
    never forming per-example gradients: about a training step's cost; see factored.py).
    device: None picks CUDA when present, else CPU.
    per_example: "auto" (batched hooks for Linear/Conv2d models, exact and about as fast as a
    training step; torch.func vmap otherwise), "hooks", "vmap", or "loop" (slow reference).
    """

    def __init__(self, model: torch.nn.Module, checkpoints: Checkpoints, loss_fn: Callable | None = None,
                 layers: str | Sequence[str] | None = None, proj_dim: int | None = None,
                 device: str | torch.device | None = None, seed: int = 0, projection: str = "gaussian",
                 per_example: str = "auto", train_mode: bool = False):
        if not isinstance(model, torch.nn.Module):
            raise TracInError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(checkpoints, Checkpoints):
            raise TracInError("checkpoints must be a Checkpoints object; build one with "
                              "Checkpoints.from_files(paths, learning_rates=[...]) or Checkpoints.from_dir(run_dir).")
        self.model, self.checkpoints, self.loss_fn = model, checkpoints, loss_fn
        self.layers, self.proj_dim, self.seed, self.projection_kind = layers, proj_dim, seed, projection
        grads = GradientComputer(model, loss_fn, layers, device, train_mode)
        proj = build_projection(projection, grads, proj_dim, seed)
        self.featurizer = Featurizer(grads, proj, per_example)
        self.device = grads.device
        self._prepared: dict[int, dict] = {}

    def __repr__(self) -> str:
        return (f"TracIn(params={self.num_params}, checkpoints={len(self.checkpoints)}, "
                f"proj_dim={self.proj_dim}, device='{self.device}')")

    @property
    def num_params(self) -> int:
        """P: the number of parameters whose gradients are used."""
        return self.featurizer.grads.num_params

    @property
    def dim(self) -> int:
        """Feature length per example per checkpoint: P (exact) or proj_dim."""
        return self.featurizer.dim

    def settings(self) -> IndexSettings:
        """What identifies an index built by this TracIn (its store's metadata; checked on reopen)."""
        return IndexSettings(
            model=state_fingerprint(self.model.state_dict()),
            parameters=tuple(self.featurizer.grads.param_names),
            checkpoints=tuple(self.checkpoints.fingerprint()),
            learning_rates=tuple(self.checkpoints.learning_rates.tolist()),
            proj_dim=self.proj_dim, seed=self.seed, projection=self.projection_kind,
            per_example=self.featurizer.mode,
            layout=self.featurizer.layout.to_dict(),
        )

    def metadata(self) -> dict:
        """settings() as the flat JSON-able dict written to metadata.json."""
        return self.settings().to_metadata()

    def resolve(self, source) -> None:
        """Settle the per-example path on the first examples before any feature is stored."""
        if not self.featurizer.resolved:
            _, x, _ = next(iter(source.batches(2)))
            state = self.state(len(self.checkpoints) - 1)
            preds = self.featurizer.grads.predictions(state, x)
            self.featurizer.resolve(state, x, preds, "prediction")

    def state(self, c: int) -> dict:
        """Checkpoint c's state dict, validated and on the device (kept while the model is small)."""
        if c in self._prepared:
            return self._prepared[c]
        state = self.featurizer.prepare(self.checkpoints.load(c), f"checkpoint {c} ({self.checkpoints[c].name})")
        if self._states_cached:
            self._prepared[c] = state
        return state

    @property
    def _states_cached(self) -> bool:
        """Whether every checkpoint's state stays in memory (small models: up to 512 MB of weights)."""
        return self.num_params * 4 * len(self.checkpoints) <= 2**29

    # -- featurize once ----------------------------------------------------------------------------
    def index(self, train_data: Any, store: str | Path | None = None, batch_size: int | None = None,
              progress: bool = True, batch_fn: BatchFn | None = None, dtype: torch.dtype | None = None,
              method: str = "tracin", segments: int = 1, **source_options: Any) -> GradientIndex:
        """Featurize the training set: GradientIndex over n_train examples x C checkpoints.

        store: None keeps features in memory; a folder path writes them memory-mapped to disk and
        resumes an interrupted run. dtype: storage dtype (default: the model's dtype in memory and for
        exact features on disk; float16 for projected features on disk). batch_size None: automatic.
        method="source": a SourceIndex (same queries) scoring with SOURCE over `segments` segments of
        the checkpoints; source_options: steps=[K_1..K_L], curvature="gn"|"mc"|"empirical" (source.py).
        """
        if method == "source":
            return build_source_index(self, train_data, segments, store=store, batch_size=batch_size,
                                      progress=progress, batch_fn=batch_fn, dtype=dtype, **source_options)
        if method != "tracin" or source_options:
            raise TracInError(f"method must be 'tracin' or 'source' (got {method!r}); options "
                              f"{sorted(source_options)} apply to method='source' only.")
        return GradientIndex(self, self.featurize_rows(train_data, store, None, batch_size, progress, batch_fn, dtype))

    def featurize_rows(self, train_data: Any, store: str | Path | None = None, rows: tuple[int, int] | None = None,
                       batch_size: int | None = None, progress: bool = True, batch_fn: BatchFn | None = None,
                       dtype: torch.dtype | None = None) -> FeatureStore:
        """Featurize examples rows=(lo, hi) (default: all) into the store: one shard of a distributed run.

        Returns the FeatureStore (complete only when every shard is done); see distributed.py.
        """
        source = as_source(train_data, batch_fn)
        if dtype is None:
            model_dtype = self.featurizer.grads.dtype
            dtype = torch.float16 if (store is not None and self.proj_dim) else model_dtype
        n, C = len(source), len(self.checkpoints)
        self.resolve(source)
        if store is None:
            fs = FeatureStore(n, C, self.dim, dtype)
        else:
            fs = FeatureStore.open_or_create(store, n, C, self.dim, dtype, self.metadata())
        featurize(self.featurizer, self.checkpoints, source, fs, batch_size, "loss", progress, rows)
        return fs

    # -- query side --------------------------------------------------------------------------------
    def predictions(self, data: Any, batch_fn: BatchFn | None = None, checkpoint: int = -1) -> torch.Tensor:
        """Predicted class of each example at a checkpoint (default: the last): Tensor (n,) int64."""
        source = as_source(data, batch_fn)
        c = checkpoint % len(self.checkpoints)
        return torch.cat([self.featurizer.grads.predictions(self.state(c), x).cpu()
                          for _, x, _ in source.batches(1024)])

    def features(self, data: Any, target: Target = "loss", batch_fn: BatchFn | None = None,
                 batch_size: int = 256) -> torch.Tensor:
        """Per-checkpoint features of (test) examples: Tensor (C, m, dim) on the device.

        target="prediction" uses the class the last checkpoint predicts (no labels needed).
        """
        source = as_source(data, batch_fn)
        preds = self.predictions(source) if isinstance(target, str) and target == "prediction" else None
        self.resolve(source)
        out = torch.empty(len(self.checkpoints), len(source), self.dim, device=self.device,
                          dtype=accum_dtype(self.featurizer.grads.dtype))
        C = len(self.checkpoints)
        if len(source) <= 64 and self._states_cached:  # a query: all checkpoints in one backward pass
            _, x, y = next(iter(source.batches(len(source))))
            out[:] = self.featurizer.many([self.state(c) for c in range(C)], x, y if preds is None else preds, target)
            for c in range(C):
                check_finite(out[c], 0, f"checkpoint {c} (test data)")
            return out
        for c in range(C):
            state = self.state(c)
            for start, x, y in source.batches(batch_size):
                if preds is not None:
                    y = preds[start:start + x.shape[0]]
                f = self.featurizer(state, x, y, target)
                check_finite(f, start, f"checkpoint {c} (test data)")
                out[c, start:start + f.shape[0]] = f
        return out

