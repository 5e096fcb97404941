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

from .. import inputs as tree
from ..checkpoints import Checkpoints, state_fingerprint
from ..data import BatchFn, as_source
from ..devices import output_device, resolve_tf32, tf32_mode
from ..errors import TracInError
from ..settings import IndexSettings
from ..fingerprint import data_fingerprint, state_digest
from ..checks import check_device, explain_input_error
from ..memory import Backoff, fits, is_oom
from ..gradients.featurize import Featurizer, check_finite, featurize
from ..gradients.per_example import GradientComputer, Target, model_mode
from .index import GradientIndex
from .source import build_source_index
from ..gradients.projection import RandomProjection, build_projection
from ..store.feature_store import FeatureStore
from ..store.scoring import accum_dtype


PILOT = 16   # examples of the first batch that settle the per-example path and the factored shares


class TracIn:
    """TracInCP over `checkpoints` for `model`.

    loss_fn: None ("classification"), a name from losses.py ("regression", "causal_lm", "masked_lm",
    "token_classification", "seq2seq"), or loss_fn(output (1, ...), target (1, ...)) -> one value
    (any reduction; it sees one example).
    output_fn: picks the tensor to attribute from what the model returns (default: a tensor as is,
    a tuple's first element, a dict's or ModelOutput's "logits"); the model is called as model(x),
    model(*x) or model(**x) for a tensor, tuple or dict batch (data.py).
    layers: None (all trainable parameters), "last", or module names.
    proj_dim: None for exact gradients (dim = P), or an int for a seeded random projection.
    projection: "auto" (default: "factored" wherever layer handlers cover the model, else
    "gaussian"), "factored" (per-layer P_g^T dW P_a from one batched forward+backward, never forming
    per-example gradients: about a training step's cost; see factored.py), or "gaussian" /
    "rademacher" (dense G R / sqrt(proj_dim) of the flat gradient).
    device: None keeps a model already on a GPU there, else picks CUDA when present, else the CPU.
    per_example: "auto" (layer handlers from one batched pass, exact and about as fast as a
    training step; else torch.func vmap; else the loop, each fallback with one warning), "hooks",
    "vmap", or "loop" (slow reference).
    tf32: whether float32 products on CUDA may use TF32 for featurization, test gradients and scoring
    (2-3x faster convolutions, ~1e-3 relative error). "auto" (default): on for a projected index
    (proj_dim set: its projection error, ~1/sqrt(proj_dim), is ten times TF32's), off for exact
    gradients, so exact mode on CUDA agrees with the CPU to float32 accuracy; True / False force it
    (devices.resolve_tf32, docs/gpu.md). The resolved bool is `self.tf32`.
    Results are returned on the CPU whatever the device (the device contract, devices.py).
    """

    def __init__(self, model: torch.nn.Module, checkpoints: Checkpoints, loss_fn: Callable | None = None,
                 layers: str | Sequence[str] | None = None, proj_dim: int | None = None,
                 device: str | torch.device | None = None, seed: int = 0, projection: str = "auto",
                 per_example: str = "auto", train_mode: bool = False, tf32: bool | str = "auto",
                 output_fn: Callable | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TracInError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not isinstance(checkpoints, Checkpoints):
            raise TracInError("checkpoints must be a Checkpoints object; build one with "
                              "Checkpoints.from_files(paths, learning_rates=[...]) or Checkpoints.from_dir(run_dir).")
        check_device(device)
        self.model, self.checkpoints, self.loss_fn = model, checkpoints, loss_fn
        self.layers, self.proj_dim, self.seed, self.projection_kind = layers, proj_dim, seed, projection
        grads = GradientComputer(model, loss_fn, layers, device, train_mode, output_fn=output_fn)
        proj = build_projection(projection, grads, proj_dim, seed)
        self.featurizer = Featurizer(grads, proj, per_example, auto_projection=projection == "auto")
        self.device = grads.device
        self._tf32_request = tf32
        self.tf32 = resolve_tf32(tf32, projected=proj_dim is not None)
        self._prepared: dict[int, dict] = {}
        self._base_digest: str | None = None   # adapter checkpoints: digest of the model's frozen weights
        self._exact: TracIn | None = None           # exact(): this TracIn without projection, made on first use

    def __repr__(self) -> str:
        return (f"TracIn(params={self.num_params}, checkpoints={len(self.checkpoints)}, "
                f"proj_dim={self.proj_dim}, device='{self.device}')")

    def layer_paths(self) -> list[dict]:
        """How each selected parameter block is featurized, for "why is this slow / refused?":
        one dict per block {"layers": "name (Type), ...", "params": [names], "numbers": per-example
        gradient size, "path": ...}. path: "kronecker" (a layer handler: products of its inputs and output
        gradients), "vector" (a small handler: norms, grouped convolutions), "generic: per-example copies"
        / "generic: vmap" / "generic: not yet known" (no handler: copies broadcast over the batch, else a
        torch.func pass restricted to them), or, when the hook path does not run at all, the featurizer's
        mode ("vmap", "loop") for every parameter. Settled by the first batch (tracin.index/features)."""
        fz = self.featurizer
        path = fz.projection if fz.mode == "factored" else fz.hooks
        if path is None:
            return [{"layers": "<all>", "params": list(fz.grads.param_names), "numbers": fz.grads.num_params,
                     "path": fz.mode}]
        generic = {True: "generic: per-example copies", False: "generic: vmap", None: "generic: not yet known"}
        return [{"layers": b.describe(), "params": list(b.params), "numbers": b.numel,
                 "path": generic[path.broadcast] if b.kind == "generic" else
                 ("kronecker" if b.kind == "kron" else "vector")} for b in path.blocks]

    @property
    def num_params(self) -> int:
        """P: the number of parameters whose gradients are used."""
        return self.featurizer.grads.num_params

    @property
    def dim(self) -> int:
        """Feature length per example per checkpoint: P (exact), or at most proj_dim. With a factored
        projection it is provisional until the first batch is seen (which layers see one position, the
        calibrated shares): read it after tracin.index() or tracin.features()."""
        return self.featurizer.dim

    def settings(self) -> IndexSettings:
        """What identifies an index built by this TracIn (its store's metadata; checked on reopen)."""
        return IndexSettings(
            model=state_fingerprint(self.model.state_dict()),
            parameters=tuple(self.featurizer.grads.param_names),
            checkpoints=tuple(self._checkpoint_identities()),
            learning_rates=tuple(self.checkpoints.learning_rates.tolist()),
            proj_dim=self.proj_dim, seed=self.seed,
            projection=None if self.proj_dim is None else self.featurizer.projection_kind,
            per_example=self.featurizer.mode,
            layout=self.featurizer.layout.to_dict(),
            projection_generator=(self.featurizer.projection.generator
                                  if isinstance(self.featurizer.projection, RandomProjection) else None),
            projection_allocation=(None if self.featurizer.allocation is None
                                   else tuple(map(tuple, self.featurizer.allocation))),
        )

    def _checkpoint_identities(self) -> list[dict]:
        """Checkpoints.fingerprint(), with "base": the digest of the model's frozen weights added to adapter
        checkpoints (they hold the adapter only; the base model they were trained on is part of them)."""
        ids = self.checkpoints.fingerprint()
        if not any(c.extra.get("adapter") for c in self.checkpoints):
            return ids
        if self._base_digest is None:
            trainable = {k for k, p in self.model.named_parameters() if p.requires_grad}
            self._base_digest = state_digest({k: v for k, v in self.model.state_dict().items() if k not in trainable})
        return [{**e, "base": self._base_digest} if c.extra.get("adapter") else e
                for e, c in zip(ids, self.checkpoints)]

    def metadata(self) -> dict:
        """settings() as the flat JSON-able dict written to metadata.json."""
        return self.settings().to_metadata()

    def explain(self, exc: Exception, data: Any, batch_fn: BatchFn | None = None,
                train: dict | None = None) -> TracInError | None:
        """Why the model failed on `data`, when the inputs are the cause (integer inputs to a float
        model; examples of another shape than the training examples, from `train`, a store's
        metadata["data"]): a TracInError to raise, else None."""
        try:
            x = as_source(data, batch_fn).example(0)[0].unsqueeze(0)
        except Exception:  # noqa: BLE001 - the data itself is the problem; keep the original error
            return None
        shape = (train or {}).get("example_shape")
        return explain_input_error(exc, x, self.featurizer.grads.dtype, shape)

    def resolve(self, source) -> None:
        """Settle the per-example path on the first examples before any feature is stored, and share a
        factored projection's proj_dim over layers by their gradient norms on up to PILOT examples at up
        to 4 checkpoints spread over the run (the first batch of `source`, targets as predicted)."""
        fz = self.featurizer
        if fz.resolved and not fz.needs_calibration:
            return
        _, x, y = next(iter(source.batches(PILOT if fz.needs_calibration else 2)))
        last = len(self.checkpoints) - 1
        if not fz.resolved:
            state = self.state(last)
            fz.resolve(state, x, fz.grads.prediction_targets(state, x, y), "prediction")
        if fz.needs_calibration:
            picks = sorted({round(i * last / 3) for i in range(4)})
            states = [self.state(c) for c in picks]
            fz.calibrate(states, [float(self.checkpoints.learning_rates[c]) for c in picks],
                         [f"checkpoint {c} ({self.checkpoints[c].name})" for c in picks], x,
                         [fz.grads.prediction_targets(s, x, y) for s in states], "prediction")

    def exact(self) -> "TracIn":
        """This TracIn without a projection: the same model, checkpoints, layers, loss, device and
        per-example path, exact gradients (P numbers per checkpoint). Itself when already exact; made
        once and kept. GradientIndex.top_k(rerank=) rescores projected candidates with it."""
        if not self.proj_dim:
            return self
        if self._exact is None:
            gc = self.featurizer.grads
            self._exact = TracIn(self.model, self.checkpoints, self.loss_fn, self.layers, None, self.device,
                                 self.seed, per_example=self.featurizer.requested, train_mode=gc.train_mode,
                                 tf32=self._tf32_request, output_fn=gc.output_fn)
        return self._exact

    def state(self, c: int) -> dict:
        """Checkpoint c's state dict, validated and on the device (kept while the model is small)."""
        if c in self._prepared:
            return self._prepared[c]
        state = self.featurizer.prepare(self.checkpoints.load(c), f"checkpoint {c} ({self.checkpoints[c].name})",
                                        self.checkpoints[c].extra.get("adapter", False))
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
        the checkpoints; source_options: steps=[K_1..K_L], curvature="auto"|"gn"|"mc"|"empirical" (source.py).
        """
        if method == "source":
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
        Before anything is allocated: the size is checked against free memory / disk; the training
        data is fingerprinted (one pass, fingerprint.data_fingerprint) and the checkpoints' tensors
        hashed, so that a store built from other data or weights is refused, never mixed. A
        complete store is opened read-only; otherwise featurizing holds the store's writer lock.
        """
        source = as_source(train_data, batch_fn)
        if dtype is None:
            model_dtype = self.featurizer.grads.dtype
            dtype = torch.float16 if (store is not None and self.proj_dim) else model_dtype
        n, C = len(source), len(self.checkpoints)
        if store is not None:  # resuming (or another rank's store): its allocation, not a new calibration
            stored = FeatureStore.stored_metadata(store)
            if stored and stored.get("projection") == "factored" and self.featurizer.mode == "factored":
                self.featurizer.adopt_projection(stored.get("layout"), stored.get("projection_allocation"))
        self._explained(lambda: self.resolve(source), source)
        FeatureStore.check_fits(n, C, self.dim, dtype, store)  # before the data pass and any allocation
        meta = {**self.metadata(), "data": data_fingerprint(source)}
        if store is None:
            fs = FeatureStore(n, C, self.dim, dtype, metadata=meta)
        else:
            fs = FeatureStore.open_complete(store, n, C, self.dim, dtype, meta)
            if fs is not None:
                return fs
            fs = FeatureStore.open_or_create(store, n, C, self.dim, dtype, meta, shared_lock=rows is not None)
        try:
            with tf32_mode(self.tf32):
                self._explained(lambda: featurize(self.featurizer, self.checkpoints, source, fs, batch_size, "loss",
                                                  progress, rows), source)
        finally:
            fs.finish_writing()
        return fs

    def _explained(self, run: Callable[[], Any], source) -> Any:
        """run(), turning a model error caused by the inputs into a clear TracInError (see explain)."""
        try:
            return run()
        except (RuntimeError, TracInError) as exc:
            err = self.explain(exc, source)
            if err is None:
                raise
            raise err from exc

    # -- query side --------------------------------------------------------------------------------
    def predictions(self, data: Any, batch_fn: BatchFn | None = None, checkpoint: int = -1) -> torch.Tensor:
        """Predicted class of each example at a checkpoint (default: the last): Tensor (n,) int64."""
        source = as_source(data, batch_fn)
        c = checkpoint % len(self.checkpoints)
        with tf32_mode(self.tf32):
            return torch.cat([self.featurizer.grads.predictions(self.state(c), x).cpu()
                              for _, x, _ in source.batches(1024)])

    def outputs(self, data: Any, batch_fn: BatchFn | None = None, checkpoint: int = -1,
                batch_size: int = 512) -> torch.Tensor:
        """Model outputs f(w_c, x) at a checkpoint (default: the last), eval mode, no gradients: Tensor
        (n, ...) float32 on the CPU (the tensor output_fn picks: logits for Hugging Face models)."""
        source = as_source(data, batch_fn)
        gc, state = self.featurizer.grads, self.state(checkpoint % len(self.checkpoints))
        with torch.no_grad(), model_mode(self.model, False), tf32_mode(self.tf32):
            return torch.cat([gc.forward(state, gc.cast(x)).float().cpu() for _, x, _ in source.batches(batch_size)])

    def features(self, data: Any, target: Target = "loss", batch_fn: BatchFn | None = None,
                 batch_size: int = 256, out_device: str | torch.device | None = None) -> torch.Tensor:
        """Per-checkpoint features of (test) examples: Tensor (C, m, dim) on the CPU, or on `out_device`
        (GradientIndex passes its device; a buffer that does not fit there stays on the CPU).

        target="prediction" uses the class the last checkpoint predicts (no labels needed; language
        models: the sequence's own tokens, see losses.py).
        Computed on the device in micro-batches under the out-of-memory policy (memory.py).
        """
        source = as_source(data, batch_fn)
        predicting = isinstance(target, str) and target == "prediction"
        self.resolve(source)
        last = self.state(len(self.checkpoints) - 1) if predicting else None
        C, m = len(self.checkpoints), len(source)
        dtype = accum_dtype(self.featurizer.grads.dtype)
        where = output_device(out_device)
        if where.type != "cpu" and not fits(C * m * self.dim * dtype.itemsize, where):
            where = torch.device("cpu")
        out = torch.empty(C, m, self.dim, device=where, dtype=dtype)
        with tf32_mode(self.tf32):
            if m <= 64 and self._states_cached and not source.is_loader:  # a query: one backward pass
                _, x, y = next(iter(source.batches(m)))
                if predicting:
                    y = self.featurizer.grads.prediction_targets(last, x, y)
                try:
                    g = self.featurizer.many([self.state(c) for c in range(C)], x, y, target)
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
                    if predicting:
                        y = self.featurizer.grads.prediction_targets(last, x, y)
                    f = size.run(lambda b: torch.cat([
                        self.featurizer(state, tree.take(x, s, s + b), None if y is None else y[s:s + b], target)
                        for s in range(0, tree.length(x), b)]))
                    check_finite(f, start, f"checkpoint {c} (test data)")
                    out[c, start:start + f.shape[0]] = f
        return out
