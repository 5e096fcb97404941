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
from ..devices import output_device, tf32_mode
from ..errors import TracInError
from ..memory import Backoff, fits, is_oom
from ..gradients.featurize import Featurizer, check_finite, featurize
from ..gradients.per_example import GradientComputer, Target
from .index import GradientIndex
from ..gradients.projection import RandomProjection, build_projection
from ..store.feature_store import FeatureStore


class TracIn:
    """TracInCP over `checkpoints` for `model`.

    loss_fn(output (1, ...), target (1, ...)) -> one value (any reduction; it sees one example).
    layers: None (all trainable parameters), "last", or module names.
    proj_dim: None for exact gradients (dim = P), or an int for a seeded random projection.
    projection: "gaussian" / "rademacher" (dense G R / sqrt(proj_dim) of the flat gradient) or
    "factored" (per-layer P_g^T dW P_a of Linear/Conv2d layers from one batched forward+backward,
    never forming per-example gradients: about a training step's cost; see factored.py).
    device: None keeps a model already on a GPU there, else picks CUDA when present, else the CPU.
    per_example: "auto" (batched hooks for Linear/Conv2d models, exact and about as fast as a
    training step; torch.func vmap otherwise), "hooks", "vmap", or "loop" (slow reference).
    tf32: allow TF32 float32 products on CUDA for featurization, test gradients and scoring (faster,
    ~1e-3 relative error); False (default) forbids it there, so CUDA agrees with the CPU (docs/gpu.md).
    Results are returned on the CPU whatever the device (the device contract, devices.py).
    """

    def __init__(self, model: torch.nn.Module, checkpoints: Checkpoints, loss_fn: Callable | None = None,
                 layers: str | Sequence[str] | None = None, proj_dim: int | None = None,
                 device: str | torch.device | None = None, seed: int = 0, projection: str = "gaussian",
                 per_example: str = "auto", train_mode: bool = False, tf32: bool = False):
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
        self.tf32 = bool(tf32)
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

    def metadata(self) -> dict:
        """What identifies an index built by this TracIn (checked when a store is reopened)."""
        return {
            "model": state_fingerprint(self.model.state_dict()),
            "parameters": self.featurizer.grads.param_names,
            "checkpoints": self.checkpoints.fingerprint(),
            "learning_rates": self.checkpoints.learning_rates.tolist(),
            "proj_dim": self.proj_dim, "seed": self.seed, "projection": self.projection_kind,
            "per_example": "loop" if self.featurizer.mode == "loop" else self.featurizer.mode,
            "layout": self.featurizer.layout.to_dict(),
            # the dense projection's generator (projection.py): R, hence the stored rows, depend on it
            **({"projection_generator": self.featurizer.projection.generator}
               if isinstance(self.featurizer.projection, RandomProjection) else {}),
        }

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
            from .source import build_source_index

            with tf32_mode(self.tf32):
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
        with tf32_mode(self.tf32):
            featurize(self.featurizer, self.checkpoints, source, fs, batch_size, "loss", progress, rows)
        return fs

    # -- query side --------------------------------------------------------------------------------
    def predictions(self, data: Any, batch_fn: BatchFn | None = None, checkpoint: int = -1) -> torch.Tensor:
        """Predicted class of each example at a checkpoint (default: the last): Tensor (n,) int64."""
        source = as_source(data, batch_fn)
        c = checkpoint % len(self.checkpoints)
        with tf32_mode(self.tf32):
            return torch.cat([self.featurizer.grads.predictions(self.state(c), x).cpu()
                              for _, x, _ in source.batches(1024)])

    def features(self, data: Any, target: Target = "loss", batch_fn: BatchFn | None = None,
                 batch_size: int = 256, out_device: str | torch.device | None = None) -> torch.Tensor:
        """Per-checkpoint features of (test) examples: Tensor (C, m, dim) on the CPU, or on `out_device`
        (GradientIndex passes its device; a buffer that does not fit there stays on the CPU).

        target="prediction" uses the class the last checkpoint predicts (no labels needed).
        Computed on the device in micro-batches under the out-of-memory policy (memory.py).
        """
        source = as_source(data, batch_fn)
        preds = self.predictions(source) if isinstance(target, str) and target == "prediction" else None
        self.resolve(source)
        C, m = len(self.checkpoints), len(source)
        dtype = torch.float64 if self.featurizer.grads.dtype == torch.float64 else torch.float32
        where = output_device(out_device)
        if where.type != "cpu" and not fits(C * m * self.dim * dtype.itemsize, where):
            where = torch.device("cpu")
        out = torch.empty(C, m, self.dim, device=where, dtype=dtype)
        with tf32_mode(self.tf32):
            if m <= 64 and self._states_cached:  # a query: all checkpoints in one backward pass
                _, x, y = next(iter(source.batches(m)))
                try:
                    g = self.featurizer.many([self.state(c) for c in range(C)], x, y if preds is None else preds,
                                             target)
                    for c in range(C):
                        check_finite(g[c], 0, f"checkpoint {c} (test data)")
                    out[:] = g
                    return out
                except Exception as exc:  # noqa: BLE001 - out of memory: fall back to checkpoint by checkpoint
                    if not is_oom(exc):
                        raise
            size = Backoff(batch_size, self.device, what="test-feature batch",
                           advice="select fewer layers or set proj_dim.")
            for c in range(C):
                state = self.state(c)
                for start, x, y in source.batches(batch_size):
                    if preds is not None:
                        y = preds[start:start + x.shape[0]]
                    f = size.run(lambda b: torch.cat([self.featurizer(state, x[s:s + b], None if y is None else
                                                                      y[s:s + b], target)
                                                      for s in range(0, x.shape[0], b)]))
                    check_finite(f, start, f"checkpoint {c} (test data)")
                    out[c, start:start + f.shape[0]] = f
        return out
