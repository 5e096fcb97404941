"""SOURCE (Bae, Lin, Lorraine, Grosse 2024): segment-wise unrolled influence, served by a GradientIndex.

Example:
    >>> index = tracin.index((X_train, y_train), method="source", segments=2)   # SourceIndex
    >>> index.influence((X_test, y_test))       # Tensor (n_test, n_train); positive = proponent
    >>> index.top_k((X_test, y_test), k=10)     # TopK, as for TracIn
    >>> index.self_influence()                  # Tensor (n_train,): SOURCE(z, z)

The C checkpoints form L segments of C / L consecutive checkpoints. Segment l has K_l optimizer
steps (from Checkpoint.step: the last step of the segment minus the last step of the one before),
mean learning rate eta_l, momentum beta_l (Checkpoint.extra["momentum"]), EK-FAC curvature H_l fitted
on its checkpoints (ekfac.py) and g_l(z), the loss gradient averaged over its checkpoints. With
c_l = eta_l K_l / (1 - beta_l), in the eigenbasis of H_l (eigenvalue s):
    S_l = exp(-c_l H_l)                        -> exp(-c_l s)
    r_l(z) = (I - S_l) H_l^{-1} g_l(z) / N     -> -expm1(-c_l s) / s  (= c_l at s = 0)
    v(z) = sum_l (prod_{l' > l} S_l') r_l(z)   (Horner: v_1 = r_1, v_l = S_l v_{l-1} + r_l)
    SOURCE(z', z) = <grad f(z', w_final), v(z)>
v(z) approximates the change of the final weights when z is removed from training, so a positive
score means removing z raises the test loss: z is a proponent, as in TracIn. The index stores v(z)
as a single "checkpoint" of weight 1 (projected like the test gradients when proj_dim is set: by the
dense projection, or block by block by the factored one, FactoredProjection.project_flat); test
features are gradients at the final checkpoint only. self_influence(z) = <grad l(z, w_final), v(z)>,
the score of z on its own loss (computed from the exact vectors).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import inputs as tree
from ..data import BatchFn, as_source
from ..devices import tf32_mode, to_output
from ..memory import Backoff, rows_that_fit
from .curvature_blocks import LayerCurvature
from .ekfac import KronLayers, choose_curvature
from .ekfac_fit import check_factor_memory, fit_ekfac
from ..errors import TracInError
from ..settings import IndexSettings, SourceSettings
from ..gradients.featurize import check_finite, progress_bar
from ..gradients.per_example import Target
from .index import GradientIndex, adopt_stored_allocation
from ..store.layout import Layout
from ..gradients.factored import FactoredProjection
from ..gradients.handlers import Unsupported
from ..store.feature_store import FeatureStore, compare_metadata
from ..store.files import check_regular, damaged
from ..store.scoring import accum_dtype


_SELF_FILE = "source_self_influence.npy"


@dataclass(frozen=True)
class SourceSegment:
    """Checkpoints c (indices), K steps, mean learning rate eta, momentum beta."""

    checkpoints: tuple[int, ...]
    steps: int
    learning_rate: float
    momentum: float

    @property
    def horizon(self) -> float:
        """c = eta K / (1 - beta): the time the segment's linearized dynamics run for."""
        return self.learning_rate * self.steps / (1.0 - self.momentum)


def plan_segments(checkpoints, segments: int, steps: Sequence[int] | None = None) -> list[SourceSegment]:
    """Split C checkpoints into `segments` groups; K_l from Checkpoint.step unless `steps` is given."""
    C = len(checkpoints)
    if not isinstance(segments, int) or isinstance(segments, bool) or segments < 1:
        raise TracInError(f"segments must be a positive integer, got {segments!r}.")
    if C % segments:
        divisors = [d for d in range(1, C + 1) if C % d == 0]
        raise TracInError(f"SOURCE splits the {C} checkpoints into equal segments, but {C} is not divisible "
                          f"by segments={segments}; use one of {divisors}.")
    m = C // segments
    groups = [tuple(range(l * m, (l + 1) * m)) for l in range(segments)]
    if steps is None:
        recorded = [checkpoints[c].step for c in range(C)]
        if any(s is None for s in recorded):
            raise TracInError("SOURCE needs the optimizer step of every checkpoint (K steps per segment); "
                              "record checkpoints with CheckpointRecorder, or pass steps=[K_1, ..., K_L].")
        ends = [int(recorded[g[-1]]) for g in groups]
        steps = [e - b for e, b in zip(ends, [0] + ends[:-1])]
    steps = [int(k) for k in steps]
    if len(steps) != segments or any(k <= 0 for k in steps):
        raise TracInError(f"steps per segment must be {segments} positive integers, got {steps}; checkpoint "
                          "steps must increase (pass steps=[K_1, ..., K_L] to override).")
    opt = {str(checkpoints[c].extra.get("optimizer", "SGD")) for c in range(C)}
    if opt - {"SGD"}:
        warnings.warn(f"SOURCE's step model is SGD (with momentum); these checkpoints come from {sorted(opt)}, "
                      "so its horizon eta K is only a rough approximation.", stacklevel=3)
    out = []
    for g, k in zip(groups, steps):
        lr = float(np.mean([checkpoints[c].learning_rate for c in g]))
        beta = float(np.mean([float(checkpoints[c].extra.get("momentum", 0.0) or 0.0) for c in g]))
        if not 0.0 <= beta < 1.0:
            raise TracInError(f"momentum must lie in [0, 1), checkpoints {g} record {beta}.")
        out.append(SourceSegment(g, k, lr, beta))
    return out


def spectral(lam: torch.Tensor, horizon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(-c s), (1 - exp(-c s)) / s) elementwise, with the s -> 0 limit c; expm1 for accuracy."""
    s = lam.clamp_min(0)
    decay = torch.exp(-horizon * s)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    gain = torch.where(s > 0, -torch.expm1(-horizon * s) / safe, torch.full_like(s, horizon))
    return decay, gain


def source_update(layers: KronLayers, curv: list[LayerCurvature], horizon: float, v: torch.Tensor | None,
                  g: torch.Tensor, n_train: int) -> torch.Tensor:
    """One Horner step v <- S_l v + r_l(g) on flat (B, P) tensors (v None: 0), in g's dtype (KronLayers.work:
    float64 for a float64 model, else float32; the spectral factors computed in float64)."""
    vm = None if v is None else layers.to_mats(v)
    out = []
    for j, (c, G) in enumerate(zip(curv, layers.to_mats(g))):
        decay, gain = (t.to(g.dtype) for t in spectral(c.lam, horizon))
        c = c.to(g.dtype)
        t = gain * c.rotate(G) / n_train
        if vm is not None:
            t = t + decay * c.rotate(vm[j])
        out.append(c.unrotate(t))
    return layers.from_mats(out)


def flat_gradients(tracin: Any, state: dict, x: torch.Tensor, y: torch.Tensor | None,
                   target: Target = "loss") -> torch.Tensor:
    """Exact per-example gradients (B, P) of the objective at one checkpoint (never projected): the hook
    path (beside a factored projection too), else the loop or vmap."""
    fz = tracin.featurizer
    hf = fz.exact_path()
    if hf is not None:
        try:
            return hf.expand(hf(state, x, y, target))
        except Unsupported:
            if fz.mode == "hooks":
                raise
            fz.drop_exact_path()                   # beside a factored projection: vmap instead
    if fz.mode == "loop":
        return fz.grads.reference(state, x, y, target)
    return fz.grads.per_example(state, x, y, target)


def _projection(tracin: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, int]:
    """(how v(z) and test gradients (B, P) are projected, the stored width): None and P (exact rows); the
    dense projection and proj_dim; or the factored projection applied to the flat vectors block by block
    (FactoredProjection.project_flat, the matrix it stands for never formed) and its expanded width."""
    proj = tracin.featurizer.projection
    if proj is None:
        return None, tracin.featurizer.grads.num_params
    if isinstance(proj, FactoredProjection):
        return proj.project_flat, proj.expanded_dim
    return proj, proj.proj_dim


class SourceIndex(GradientIndex):
    """A GradientIndex whose one stored "checkpoint" holds v(z) (weight 1); queries use final gradients."""

    records_outputs = False  # rows are v(z), written by build_source_index; outliers use SOURCE(z, z)

    def __init__(self, tracin: Any, store: FeatureStore, settings: SourceSettings, self_scores: torch.Tensor):
        super().__init__(tracin, store)
        self.settings = settings
        self._self = self_scores.double().cpu()

    def __repr__(self) -> str:
        return (f"SourceIndex(n_train={self.n_train}, segments={self.settings.segments}, "
                f"curvature={self.settings.curvature!r}, "
                f"dim={self.store.dim}, proj_dim={self.tracin.proj_dim})")

    def row_layout(self) -> list | None:
        """None: SOURCE's rows are v(z) projected from flat vectors, in no layout of the featurizer's."""
        return None

    @property
    def learning_rates(self) -> torch.Tensor:
        return torch.ones(1, dtype=torch.float64)

    @property
    def layout(self) -> Layout:
        return Layout.dense_of(self.store.dim)

    def test_features(self, test_data: Any, target: Target = "loss", batch_fn: BatchFn | None = None,
                      batch_size: int = 256, out_device: str | torch.device | None = None) -> torch.Tensor:
        """Gradients at the final checkpoint (projected like v when proj_dim is set): (1, m, dim), on the
        CPU (or out_device); computed in micro-batches under the out-of-memory policy (memory.py)."""
        tr = self.tracin
        source = as_source(test_data, batch_fn)
        predicting = isinstance(target, str) and target == "prediction"
        self.check_projection()
        tr.resolve(source)
        (proj, _), state = _projection(tr), tr.state(len(tr.checkpoints) - 1)
        size = Backoff(batch_size, tr.device, what="SOURCE test batch", advice="set proj_dim or select fewer layers.")

        def rows_of(x: torch.Tensor, y: torch.Tensor | None, start: int, b: int) -> torch.Tensor:
            parts = []
            for s in range(0, tree.length(x), b):
                g = flat_gradients(tr, state, tree.take(x, s, s + b), None if y is None else y[s:s + b], target)
                check_finite(g, start + s, "the final checkpoint (test data)")
                g = proj(g) if proj is not None else g
                parts.append(to_output(g.to(accum_dtype(g.dtype)),
                                       out_device))
            return torch.cat(parts)

        rows = []
        for start, x, y in source.batches(batch_size):
            if predicting:
                y = tr.featurizer.grads.prediction_targets(state, x, y)
            rows.append(size.run(lambda b: rows_of(x, y, start, b)))
        return torch.cat(rows).unsqueeze(0)

    def self_influence(self, weights: torch.Tensor | None = None, *,
                       out_device: str | torch.device | None = None) -> torch.Tensor:
        """SOURCE(z, z) = <grad l(z, w_final), v(z)>: Tensor (n_train,) float64 (weights: (1,) scale),
        on the CPU (or out_device)."""
        return to_output(self._self * self._weights(weights)[0], out_device)

    def self_influence_per_checkpoint(self, weights: torch.Tensor | None = None, *,
                                      out_device: str | torch.device | None = None) -> torch.Tensor:
        """The single SOURCE term: Tensor (1, n_train) float64, on the CPU (or out_device)."""
        return self.self_influence(weights, out_device=out_device).unsqueeze(0)

    def metadata(self) -> dict:
        """The store's metadata: the TracIn's settings described as this SOURCE index."""
        return self.tracin.settings().with_method(self.settings, self.layout.to_dict()).to_metadata()

    def _write_files(self, folder: Path) -> None:
        self.store.copy_to(folder, self.metadata())
        np.save(folder / _SELF_FILE, self._self.numpy())

    def save(self, path: str | Path) -> Path:
        """Write the SOURCE index to folder `path` (rules of GradientIndex.save)."""
        path = Path(path)
        if self.store.path is not None and Path(self.store.path).resolve() == path.resolve():
            np.save(path / _SELF_FILE, self._self.numpy())
            return path
        return super().save(path)

    @staticmethod
    def holds(path: str | Path) -> bool:
        """Whether folder `path` looks like a saved SOURCE index (its self-influence file is there)."""
        return (Path(path) / _SELF_FILE).exists()

    @classmethod
    def load(cls, path: str | Path, tracin: Any) -> "SourceIndex":
        """Reopen a saved SOURCE index read-only; its settings and `tracin` must match what built it."""
        store = FeatureStore.load(path)
        if store.metadata.get("method") != "source" or not (Path(path) / _SELF_FILE).exists():
            raise TracInError(f"{path} does not hold a SOURCE index; use GradientIndex.load for TracIn indexes.")
        settings = IndexSettings.from_metadata(store.metadata).source
        adopt_stored_allocation(tracin.featurizer, store.metadata, None)     # rows in no featurizer layout
        meta = tracin.settings().with_method(settings, Layout.dense_of(store.dim).to_dict()).to_metadata()
        compare_metadata(store.metadata, meta, Path(path))
        self_file = Path(path) / _SELF_FILE
        check_regular(self_file)
        selfs = np.load(self_file, allow_pickle=False)
        if selfs.shape != (store.n,) or selfs.dtype != np.float64:
            raise damaged(self_file, f"holds a {selfs.dtype} array of shape {selfs.shape}, expected float64 ({store.n},)")
        return cls(tracin, store, settings, torch.from_numpy(selfs))


def build_source_index(tracin: Any, train_data: Any, segments: int = 1, steps: Sequence[int] | None = None,
                       curvature: str = "auto", store: str | Path | None = None, batch_size: int | None = None,
                       progress: bool = True, batch_fn: BatchFn | None = None,
                       dtype: torch.dtype | None = None) -> SourceIndex:
    """Fit EK-FAC per segment, compute v(z) for every training example, store it: SourceIndex.

    Cost: 2 curvature passes per checkpoint (each one backward per output dimension with
    curvature="gn", one with "mc" and "empirical"), plus one gradient per example per checkpoint.
    curvature "auto": "gn" for models with at most output_curvature.GN_OUTPUTS outputs per example, else "mc".
    batch_size None: what fits in the device's free memory (about 8 float64 copies of a flat gradient
    per example), at most 256; the EK-FAC passes and every batch run under the out-of-memory policy
    (memory.Backoff: a failed batch is split in halves and computed again).
    """
    source = as_source(train_data, batch_fn)
    plan = plan_segments(tracin.checkpoints, segments, steps)
    layers = KronLayers(tracin.featurizer.grads)
    tracin.resolve(source)
    proj, dim = _projection(tracin)
    device = tracin.device
    curvature = choose_curvature(curvature, layers, tracin.state(plan[0].checkpoints[0]), source)
    check_factor_memory(layers)
    bs = batch_size or rows_that_fit(8 * 8 * layers.num_params, device, maximum=256)
    n = len(source)
    bar = progress_bar(len(tracin.checkpoints), progress)
    curv = []
    fit_size = Backoff(bs, device, what="EK-FAC batch", advice="select fewer layers (layers=[...]).")
    for seg in plan:
        states = [tracin.state(c) for c in seg.checkpoints]
        with tf32_mode(False):                   # the curvature in IEEE float32 / float64 on CUDA, whatever the flags
            curv.append(fit_size.run(lambda b: fit_ekfac(layers, states, source, curvature, b, tracin.seed)))
        bar.update(len(seg.checkpoints))
    bar.close()
    settings = SourceSettings(segments, tuple(s.steps for s in plan), curvature, tuple(s.horizon for s in plan))
    dtype = dtype or accum_dtype(tracin.featurizer.grads.dtype)
    meta = tracin.settings().with_method(settings, Layout.dense_of(dim).to_dict()).to_metadata()
    fs = FeatureStore(n, 1, dim, dtype) if store is None else FeatureStore.open_or_create(store, n, 1, dim, dtype, meta)
    selfs = torch.zeros(n, dtype=torch.float64)
    last = len(tracin.checkpoints) - 1

    work = [[c.to(layers.work) for c in cv] for cv in curv]          # the rotations in the model's precision

    def rows_of(x: torch.Tensor, y: torch.Tensor | None, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored rows f (B, dim), SOURCE(z, z) (B,)) of one micro-batch."""
        v, g_final = None, None
        for seg, cv in zip(plan, work):
            g_sum = 0
            for c in seg.checkpoints:
                g = flat_gradients(tracin, tracin.state(c), x, y).to(layers.work)
                check_finite(g, start, f"checkpoint {c}")
                g_sum = g_sum + g
                if c == last:
                    g_final = g
            v = source_update(layers, cv, seg.horizon, v, g_sum / len(seg.checkpoints), n)
        f = proj(v.to(accum_dtype(dtype))) if proj is not None else v
        return f, (g_final.double() * v.double()).sum(1)

    def batch_rows(x: torch.Tensor, y: torch.Tensor | None, start: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [rows_of(tree.take(x, s, s + b), None if y is None else y[s:s + b], start + s)
                 for s in range(0, tree.length(x), b)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    size = Backoff(bs, device, what="SOURCE batch", advice="select fewer layers (layers=[...]) or set proj_dim.")
    for start, x, y in source.batches(bs):
        with tf32_mode(tracin.tf32):             # the TracIn's policy, as for its own rows (IEEE for exact ones)
            f, self_scores = size.run(lambda b: batch_rows(x, y, start, b))
        selfs[start:start + tree.length(x)] = self_scores.cpu()
        fs.write(0, start, f, f.double().pow(2).sum(1))
    fs.finish_writing()
    index = SourceIndex(tracin, fs, settings, selfs)
    if store is not None:
        np.save(Path(store) / _SELF_FILE, selfs.numpy())
    return index
