"""The only loop over the training set: checkpoint by checkpoint, batch by batch, into a FeatureStore.

Each checkpoint is loaded once per pass; batches whose rows are already marked done are skipped,
so an interrupted featurization resumes where it stopped.
"""

from __future__ import annotations

import math

import torch

from .checkpoints import Checkpoints
from .data import DataSource
from .errors import TracInError
from .gradients import GradientComputer, Target
from .projection import RandomProjection
from .store import FeatureStore


class Featurizer:
    """Per-example features at one checkpoint: exact gradients (dim = P) or projected (dim = proj_dim).

    features(state, x, y) = G or G R / sqrt(proj_dim), G: (B, P) per-example gradients.
    """

    def __init__(self, grads: GradientComputer, projection: RandomProjection | None = None,
                 per_example: str = "vmap"):
        if per_example not in ("vmap", "loop"):
            raise TracInError(f"per_example must be 'vmap' or 'loop', got {per_example!r}.")
        self.grads, self.projection, self.per_example = grads, projection, per_example

    @property
    def dim(self) -> int:
        return self.projection.proj_dim if self.projection else self.grads.num_params

    def prepare(self, state: dict, name: str = "checkpoint") -> dict:
        return self.grads.prepare(state, name)

    def __call__(self, state: dict, x: torch.Tensor, y: torch.Tensor | None, target: Target = "loss") -> torch.Tensor:
        """Tensor (B, dim) in float32 (or float64 for a float64 model)."""
        compute = self.grads.per_example if self.per_example == "vmap" else self.grads.reference
        while True:
            try:
                g = compute(state, x, y, target)
                break
            except torch.OutOfMemoryError:
                if self.grads.memory_budget < 2**20:
                    raise
                self.grads.memory_budget //= 2  # back off and retry with smaller chunks
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if g.dtype not in (torch.float32, torch.float64):
            g = g.float()
        return self.projection(g) if self.projection else g


def check_finite(feats: torch.Tensor, start: int, checkpoint_name: str) -> None:
    """Raise naming the example indices whose features are NaN or infinite."""
    bad = (~torch.isfinite(feats).all(1)).nonzero().flatten()
    if len(bad):
        idx = (bad + start).tolist()
        raise TracInError(
            f"non-finite gradients (NaN or inf) at {checkpoint_name} for example indices {idx[:20]}"
            f"{' ...' if len(idx) > 20 else ''}. Check those inputs and labels, or whether the "
            "checkpoint's weights are finite; rows computed so far are kept.")


def featurize(featurizer: Featurizer, checkpoints: Checkpoints, source: DataSource, store: FeatureStore,
              batch_size: int, target: Target = "loss", progress: bool = True,
              rows: tuple[int, int] | None = None) -> FeatureStore:
    """Fill `store` with features of every example at every checkpoint; skip rows already done.

    rows=(lo, hi) restricts the work to examples lo..hi-1 (one shard of a distributed run).
    """
    lo, hi = rows or (0, len(source))
    n_batches = len(source.data) if source.is_loader else math.ceil(len(source) / batch_size)
    bar = _progress(len(checkpoints) * n_batches, progress)
    try:
        for c in range(len(checkpoints)):
            if store.is_done(c, lo, hi):
                bar.update(n_batches)
                continue
            name = f"checkpoint {c} ({checkpoints[c].name})"
            state = featurizer.prepare(checkpoints.load(c), name)
            computed = 0

            def skip(s: int, e: int) -> bool:
                return e <= lo or s >= hi or store.is_done(c, max(s, lo), min(e, hi))

            for start, x, y in source.batches(batch_size, skip=skip):
                a, b = max(start, lo) - start, min(start + x.shape[0], hi) - start
                feats = featurizer(state, x[a:b], None if y is None else y[a:b], target)
                check_finite(feats, start + a, name)
                store.write(c, start + a, feats)
                computed += 1
                bar.update(1)
            bar.update(n_batches - computed)
    finally:
        bar.close()
    return store


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="featurize (checkpoints x batches)", unit="batch")
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
