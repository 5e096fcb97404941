"""The only loop over the training set: checkpoint by checkpoint, batch by batch, into a FeatureStore.

Each checkpoint is loaded once per pass; batches whose rows are already marked done are skipped,
so an interrupted featurization resumes where it stopped.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Collection

import torch

from .. import inputs as tree
from ..checkpoints import Checkpoints
from ..data import DataSource
from ..errors import TracInError
from ..memory import Backoff, rows_that_fit
from . import hooks
from .per_example import GradientComputer, Target, VmapFailed
from ..store.layout import Layout
from .factored import FactoredProjection
from .projection import RandomProjection
from ..store.feature_store import FeatureStore
from ..store.writer import RowWriter, non_finite_rows, raise_non_finite, row_sums


class Featurizer:
    """Per-example features at one checkpoint, as rows of `layout` (see layout.py).

    per_example: "auto" (hooks, i.e. layer handlers from one batched pass, when they cover the
    selected parameters; else torch.func vmap; else the loop), "hooks", "vmap" (torch.func) or
    "loop" (slow reference). Under "auto" each fallback happens once, with one warning, on the
    first batch (resolve) or, between vmap and loop (same rows), on any later batch.
    With a RandomProjection the rows are G R / sqrt(proj_dim) of the flat gradients G (B, P); with a
    FactoredProjection (mode "factored") they are per-layer factored projections from one batched
    pass (see factored.py); without a projection, exact gradients (dense or factored). A
    FactoredProjection built for projection="auto" (auto_projection=True) falls back to the dense
    Gaussian projection when the hooks cannot run on this model.
    """

    MODES = ("auto", "hooks", "vmap", "loop")

    def __init__(self, grads: GradientComputer, projection: RandomProjection | FactoredProjection | None = None,
                 per_example: str = "auto", auto_projection: bool = False):
        if per_example not in self.MODES:
            raise TracInError(f"per_example must be one of {self.MODES}, got {per_example!r}.")
        self.grads, self.projection, self.requested = grads, projection, per_example
        self.auto_projection = auto_projection
        self._exact: hooks.HookFeaturizer | bool | None = None   # exact_path() beside a factored projection
        if isinstance(projection, FactoredProjection):
            self.hooks, self.mode, self.resolved = None, "factored", False
            return
        self.hooks = hooks.build(grads) if per_example in ("auto", "hooks") else None
        if per_example == "hooks" and self.hooks is None:
            raise TracInError("per_example='hooks' needs layer handlers for every selected layer "
                              "(docs/handlers.md); use per_example='vmap'.")
        self.mode = "hooks" if self.hooks else ("vmap" if per_example == "auto" else per_example)
        self.resolved = self.mode == "loop" or per_example == "vmap"

    @property
    def projection_kind(self) -> str | None:
        """"factored", the dense kind ("gaussian" / "rademacher"), or None (exact)."""
        if self.projection is None:
            return None
        return "factored" if isinstance(self.projection, FactoredProjection) else self.projection.kind

    @property
    def layout(self) -> Layout:
        if isinstance(self.projection, FactoredProjection):
            return self.projection.layout
        if self.projection:
            return Layout.dense_of(self.projection.proj_dim)
        return self.hooks.layout if self.mode == "hooks" else Layout.dense_of(self.grads.num_params)

    @property
    def dim(self) -> int:
        return self.layout.dim

    def sq_norms(self, feats: torch.Tensor) -> torch.Tensor:
        """(B,) squared norms of the gradients that rows `feats` (B, dim) represent."""
        return self.layout.sq_norms(feats)

    def prepare(self, state: dict, name: str = "checkpoint", adapter: bool = False) -> dict:
        return self.grads.prepare(state, name, adapter)

    def resolve(self, state: dict, x: torch.Tensor, y: torch.Tensor | None, target: Target = "loss") -> None:
        """Settle the path on a couple of examples before any row is stored: the hook path (and its
        layout), else under "auto" vmap, else the loop; projection="auto": factored, else gaussian."""
        if self.resolved:
            return
        x2, y2 = tree.take(x, 0, 2), None if y is None else y[:2]
        if self.mode in ("hooks", "factored"):
            try:
                self._hook_path(state, x2, y2, target)
            except hooks.Unsupported as exc:
                if isinstance(exc, hooks.GenericLayers) and self._leave_generic(exc.modules):
                    return self.resolve(state, x, y, target)      # those layers generic, the rest on hooks
                if self.mode == "factored":
                    if not self.auto_projection:
                        raise TracInError(f"projection='factored' cannot handle this model ({exc}); "
                                          "use projection='gaussian'.") from exc
                    warnings.warn(f"projection='auto': the factored projection cannot run on this model ({exc}); "
                                  "using the dense Gaussian projection (slower).", stacklevel=3)
                    self.use_dense_projection()
                    return self.resolve(state, x, y, target)
                elif self.requested == "hooks":
                    raise TracInError(f"per_example='hooks' cannot run on this model: {exc}; use 'vmap'.") from exc
                else:
                    warnings.warn(f"per_example='auto': the layer-handler path cannot run on this model ({exc}); "
                                  "using torch.func vmap (slower).", stacklevel=3)
                    self.hooks, self.mode = None, "vmap"
        if self.mode == "vmap" and self.requested == "auto":
            try:
                self.grads.per_example(state, x2, y2, target)
            except VmapFailed as exc:
                self._to_loop(exc)
        self.resolved = True

    def _leave_generic(self, modules: Collection[str]) -> bool:
        """Rebuild the hook path (and a factored projection) with `modules` on the generic path (their input
        is shared by the batch, or a weight is also used outside them: hooks.GenericLayers); False when that
        cannot be done (then the usual fallback)."""
        path = self._hook_path
        exclude = path.exclude | set(modules)
        if exclude == path.exclude:
            return False
        try:
            if self.mode == "factored":
                p = self.projection
                self.projection = FactoredProjection(self.grads, p.proj_dim, p.seed, p.kind, exclude=exclude)
            if self.hooks is not None:
                self.hooks = hooks.HookFeaturizer(self.grads, exclude=exclude)
        except (hooks.Unsupported, TracInError):
            return False
        return True

    def exact_path(self) -> hooks.HookFeaturizer | None:
        """A hook path for exact per-example gradients (SOURCE's): this featurizer's own, or beside a factored
        projection one built for them (its generic exclusions kept); None where the handlers cannot run."""
        if self.mode == "hooks":
            return self.hooks
        if self.mode != "factored" or self._exact is False:
            return None
        if self._exact is None:
            try:
                self._exact = hooks.HookFeaturizer(self.grads, exclude=self.projection.exclude)
            except hooks.Unsupported:
                self._exact = False
                return None
        return self._exact

    def drop_exact_path(self) -> None:
        """The exact hook path beside a factored projection failed its checks: vmap from now on."""
        self._exact = False

    def use_dense_projection(self) -> None:
        """Replace a FactoredProjection by the dense Gaussian one of the same proj_dim and seed (unresolved)."""
        p = self.projection
        self.projection = RandomProjection(self.grads.num_params, p.proj_dim, p.seed)
        self.hooks = hooks.build(self.grads) if self.requested in ("auto", "hooks") else None
        self.mode = "hooks" if self.hooks is not None else ("vmap" if self.requested == "auto" else self.requested)
        self.resolved = self.mode == "loop" or self.requested == "vmap"

    def _to_loop(self, exc: Exception) -> None:
        warnings.warn(f"per_example='auto': torch.func cannot compute per-example gradients for this model "
                      f"({str(exc).split('. A layer')[0]}); using the per-example loop (slower).", stacklevel=4)
        self.mode = "loop"

    def adopt(self, mode: str, layout: list | None = None, allocation: list | None = None) -> None:
        """Use the mode (and the hook path's layout, Layout.to_dict(), and the factored projection's
        allocation) an existing index was built with."""
        if self.requested == "auto" and mode in ("vmap", "loop") and self.mode != "factored":
            self.hooks, self.mode = None, mode
        self.adopt_projection(layout, allocation)
        self.resolved = True

    def adopt_projection(self, layout: list | None, allocation: list | None) -> None:
        """Take a stored index's row layout and factored allocation (None: keep this featurizer's)."""
        if self.mode in ("hooks", "factored") and layout is not None:
            self._hook_path.adopt_layout(layout)
        if self.mode == "factored" and allocation is not None:
            self.projection.adopt_allocation(allocation)

    @property
    def allocation(self) -> list | None:
        """The factored projection's per-block allocation (FactoredProjection.allocation), else None."""
        return self.projection.allocation() if self.mode == "factored" else None

    @property
    def needs_calibration(self) -> bool:
        """Whether the factored projection still shares proj_dim equally (calibrate() settles it)."""
        return self.mode == "factored" and not self.projection.calibrated

    def calibrate(self, states: list[dict], learning_rates: list[float], names: list[str], x, ys: list,
                  target: Target = "loss") -> None:
        """Share proj_dim over blocks by their gradient norms on a pilot batch x (B examples) at checkpoints
        `states` (named `names`, targets ys[c] for each): block weight w_b = sqrt(sum_c eta_c^2 m_bc^2),
        m_bc the mean of ||P^T g_b||^2 at checkpoint c (the variance of TracIn's sum over checkpoints;
        factored.py _allocate)."""
        acc = torch.zeros(len(self.projection.blocks), dtype=torch.float64)
        for state, lr, name, y in zip(states, learning_rates, names, ys):
            rows = self.rows(state, x, y, target).features
            check_finite(rows, 0, f"{name} (calibrating the projection on the first examples)")
            m = torch.tensor(self.projection.block_sq_norms(rows), dtype=torch.float64)
            acc += (lr * m) ** 2
        self.projection.calibrate(acc.sqrt().tolist())

    def __call__(self, state: dict, x: torch.Tensor, y: torch.Tensor | None, target: Target = "loss") -> torch.Tensor:
        """Tensor (B, dim) in float32 (or float64 for a float64 model)."""
        return self._rows(state, x, y, target, with_outputs=False).features

    def rows(self, state: dict, x: torch.Tensor, y: torch.Tensor | None, target: Target = "loss",
             rows_out: torch.Tensor | None = None) -> "Rows":
        """Features (B, dim) with each example's output-gradient norm and objective: Rows.

        rows_out: an optional contiguous (B, dim) buffer the hook paths (exact and factored) write the
        features into when its dtype and device match theirs (then Rows.features is `rows_out`); the vmap
        and loop paths allocate their own. For callers that store each batch before the next.
        """
        return self._rows(state, x, y, target, with_outputs=True, rows_out=rows_out)

    def _rows(self, state: dict, x: torch.Tensor, y: torch.Tensor | None, target: Target,
              with_outputs: bool, rows_out: torch.Tensor | None = None) -> "Rows":
        self.resolve(state, x, y, target)
        out_sq = losses = None
        while True:
            try:  # out-of-memory errors pass through unchanged: the caller's memory.Backoff halves the batch
                if self.mode in ("hooks", "factored"):
                    g, out_sq, losses = (t[0] for t in self._hook_path.many_with_outputs(
                        [state], x, y, target, None if rows_out is None else rows_out.unsqueeze(0)))
                else:
                    try:
                        g = (self.grads.per_example if self.mode == "vmap" else self.grads.reference)(state, x, y, target)
                    except VmapFailed as exc:
                        if self.requested != "auto":
                            raise
                        self._to_loop(exc)
                        continue
                    if with_outputs:
                        out_sq, losses = self.grads.output_stats(state, x, y, target)
                break
            except hooks.Unsupported as exc:
                if self.mode == "factored":
                    raise TracInError(f"projection='factored' cannot handle this model ({exc}); "
                                      "use projection='gaussian'.") from exc
                raise TracInError(f"the hook path stopped working on this data ({exc}); "
                                  "pass per_example='vmap' to TracIn.") from exc
        if g.dtype not in (torch.float32, torch.float64):
            g = g.float()
        if self.projection is not None and self.mode != "factored":
            g = self.projection(self.hooks.expand(g) if self.mode == "hooks" else g)
        return Rows(g, out_sq, losses)

    @property
    def _hook_path(self) -> hooks.HookFeaturizer:
        return self.projection if self.mode == "factored" else self.hooks

    def many(self, states: list[dict], x: torch.Tensor, y: torch.Tensor | None, target: Target = "loss"
             ) -> torch.Tensor:
        """Tensor (S, B, dim): one batch at S checkpoints (one backward pass on the exact hook path)."""
        self.resolve(states[-1], x, y, target)
        if self.mode == "hooks" and self.projection is None:
            g = self.hooks.many(states, x, y, target)
            return g if g.dtype in (torch.float32, torch.float64) else g.float()
        return torch.stack([self(state, x, y, target) for state in states])


@dataclass(frozen=True)
class Rows:
    """One batch featurized at one checkpoint.

    features (B, dim): rows of the layout; out_sq_norms (B,) float64: ||dl(f(z), y)/df(z)||^2 with f the
    model output (the gradient of an output-layer bias); losses (B,) float64: the objective l(z).
    The last two can be None where they were not asked for (Featurizer.__call__ on the vmap and
    loop paths skips their extra pass; the hook paths always have them).
    """

    features: torch.Tensor
    out_sq_norms: torch.Tensor | None
    losses: torch.Tensor | None


def check_finite(feats: torch.Tensor, start: int, checkpoint_name: str) -> None:
    """Raise naming the example indices (start + row) whose features (B, dim) are NaN or infinite.

    One row-sum pass (NaN and inf propagate to the sum); rows whose sum is not finite (or
    overflowed) are then checked entry by entry, so no (B, dim) boolean mask is built for good rows.
    """
    bad = non_finite_rows(feats, row_sums(feats))
    if bad:
        raise_non_finite(bad, start, checkpoint_name)


def auto_batch_size(featurizer: Featurizer) -> int:
    """Starting batch size when none is given: what fits in the device's free memory (memory.py),
    at most 1024 on CUDA and 256 elsewhere; halved on out-of-memory.

    Bytes per example: 4 copies of its flat gradient (float32) when the path forms it (vmap, loop,
    dense projection), else 4 copies of its stored row, plus 64 KB for activations; a factored
    projection adds 2 float32 copies of the largest weight gradient its dense route may form.
    """
    grads = featurizer.grads
    flat = featurizer.mode in ("vmap", "loop") or isinstance(featurizer.projection, RandomProjection)
    per_row = 16 * (grads.num_params if flat else featurizer.dim) + 2**16
    if featurizer.mode == "factored":
        per_row += 8 * featurizer.projection.dense_numel()
    return rows_that_fit(per_row, grads.device, maximum=1024 if grads.device.type == "cuda" else 256)


class _Chunk:
    """The micro-batch size in use, under the engine's one out-of-memory policy (memory.Backoff), and
    where each micro-batch's rows are written on the CPU: in place in the store when it can take them
    (FeatureStore.destination: no copy), else into one rows buffer reused by every micro-batch (each is
    stored before the next is computed). A fresh buffer of exact rows (hundreds of MB) costs page faults
    on first write, and a copy into the store another pass over them (buffers.py)."""

    def __init__(self, size: int, device: torch.device):
        self.backoff = Backoff(size, device, what="featurization micro-batch",
                               advice="select fewer layers (layers=[...]) or set proj_dim / projection='factored'.")
        self.cpu = torch.device(device).type == "cpu"
        self.buffer: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.backoff.size

    def out(self, b: int, dest: torch.Tensor | None) -> torch.Tensor | None:
        """Where b rows go: the store's rows `dest` unless the rows are known not to fit there (another
        dtype), else a (b, dim) view of the reused buffer; None on accelerators (their allocator reuses)."""
        if not self.cpu:
            return None
        kept = self.buffer
        if dest is not None and (kept is None or kept.dtype == dest.dtype):
            return dest
        return None if kept is None or kept.shape[0] < b else kept[:b]

    def keep(self, features: torch.Tensor, dest: torch.Tensor | None) -> None:
        """After `features` (B, dim) are stored: keep them as the buffer when none that large is kept
        (never the store's own rows)."""
        if not self.cpu or not features.is_contiguous() or (dest is not None and features.data_ptr() == dest.data_ptr()):
            return
        b = self.buffer
        if b is None or b.shape[0] < features.shape[0] or b.shape[1:] != features.shape[1:] or b.dtype != features.dtype:
            self.buffer = features

    def compute(self, featurizer: Featurizer, state: dict, x: torch.Tensor, y: torch.Tensor | None,
                target: Target, dest: Callable[[int, int], torch.Tensor | None] = lambda start, stop: None
                ) -> Iterator[tuple[int, Rows, torch.Tensor]]:
        """(offset in the batch, Rows of one micro-batch, their squared norms (B',) float64), micro-batch by
        micro-batch: the caller stores each before the next is computed, so the device never holds more
        than one micro-batch's rows (an out-of-memory error halves the micro-batch and computes it again).
        dest(start, stop): the store's rows for examples start..stop of this batch, or None."""
        n, start = tree.length(x), 0
        while start < n:
            def step(size: int) -> tuple[Rows, torch.Tensor, torch.Tensor | None]:
                xs = tree.take(x, start, start + size)
                into = dest(start, start + tree.length(xs))
                rows = featurizer.rows(state, xs, None if y is None else y[start:start + size], target,
                                       rows_out=self.out(tree.length(xs), into))
                return rows, featurizer.sq_norms(rows.features), into

            rows, sq_norms, into = self.backoff.run(step)
            yield start, rows, sq_norms      # the caller stores them before asking for the next
            self.keep(rows.features, into)
            start += len(sq_norms)


def _destination(store: FeatureStore, c: int, at: int) -> Callable[[int, int], torch.Tensor | None]:
    """dest(s, e) for _Chunk.compute: the store's rows at + s .. at + e of checkpoint c, or None."""
    return lambda s, e: store.destination(c, at + s, at + e)


def featurize(featurizer: Featurizer, checkpoints: Checkpoints, source: DataSource, store: FeatureStore,
              batch_size: int | None = None, target: Target = "loss", progress: bool = True,
              rows: tuple[int, int] | None = None) -> FeatureStore:
    """Fill `store` with features of every example at every checkpoint; skip rows already done.

    batch_size None: auto_batch_size; on out-of-memory the batch is split in halves (and stays
    smaller: memory.Backoff). rows=(lo, hi) restricts the work to examples lo..hi-1 (one shard of a distributed run).
    Rows are written (and flushed, on disk) micro-batch by micro-batch through a RowWriter (on CUDA
    one micro-batch behind the GPU, store/writer.py), so an interruption loses at most the micro-batch
    in flight. Rows written without output norms or losses (an older store) are redone.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise TracInError(f"batch_size must be a positive integer or None (automatic), got {batch_size!r}.")
    batch_size = batch_size or auto_batch_size(featurizer)
    chunk = _Chunk(batch_size, featurizer.grads.device)
    lo, hi = rows or (0, len(source))
    store.redo_rows_without_outputs(lo, hi)  # rows of a store written before output norms were recorded
    n_batches = len(source.data) if source.is_loader else math.ceil(len(source) / batch_size)
    bar = progress_bar(len(checkpoints) * n_batches, progress)
    writer = RowWriter(store, featurizer.grads.device)
    try:
        for c in range(len(checkpoints)):
            if store.is_done(c, lo, hi):
                bar.update(n_batches)
                continue
            name = f"checkpoint {c} ({checkpoints[c].name})"
            state = featurizer.prepare(checkpoints.load(c), name, checkpoints[c].extra.get("adapter", False))
            computed = 0

            def skip(s: int, e: int) -> bool:
                return e <= lo or s >= hi or store.is_done(c, max(s, lo), min(e, hi))

            for start, x, y in source.batches(batch_size, skip=skip):
                a, b = max(start, lo) - start, min(start + tree.length(x), hi) - start
                for off, rows, sq_norms in chunk.compute(featurizer, state, tree.take(x, a, b),
                                                         None if y is None else y[a:b], target,
                                                         _destination(store, c, start + a)):
                    writer.put(c, start + a + off, rows.features, sq_norms, name,
                               out_sq_norms=rows.out_sq_norms, losses=rows.losses)
                computed += 1
                bar.update(1)
            writer.flush()
            bar.update(n_batches - computed)
    except BaseException:
        try:
            writer.flush()              # rows computed before the error are kept
        except Exception:  # noqa: BLE001 - the first error is the one to report
            writer.discard()
        raise
    finally:
        bar.close()
    return store


def progress_bar(total: int, enabled: bool, desc: str = "featurize (checkpoints x batches)", unit: str = "batch"):
    """A tqdm.auto bar over `total` steps when enabled and tqdm is installed, else a no-op bar."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit=unit)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
