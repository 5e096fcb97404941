"""GradientIndex: the training set featurized once; queries answered from the stored features.

Example:
    >>> index = tracin.index((X_train, y_train))
    >>> index.influence((X_test, y_test))          # Tensor (n_test, n_train); positive = proponent
    >>> best = index.top_k((X_test, y_test), k=10)  # TopK: .proponents / .opponents (indices, scores)
    >>> index.self_influence()                     # Tensor (n_train,)

Scores follow TracInCP: S(z, z') = sum_c eta_c <g_c(z), g_c(z')>, g_c the (projected) gradient at
checkpoint c, eta_c its learning rate. See scoring.py for the similarity and self-influence formulas.

Devices (docs/gpu.md): queries compute on the TracIn's device (CUDA when present) against the
stored features as device_features() serves them there (resident once when they fit, else streamed
from pinned memory); every result is returned on the CPU, or on `out_device=` when given.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch

from ..data import BatchFn, as_source
from ..devices import output_device, to_output
from ..errors import TracInError
from ..fingerprint import data_fingerprint
from ..checks import check_k
from ..gradients.per_example import Target
from ..store.scoring import full_scores, score_blocks, self_influence
from ..store import files
from ..store.feature_store import FeatureStore, compare_metadata
from ..store.residency import DeviceFeatures
from ..store.topk import TopK, streaming_top_k
from .rerank import exact_influence_per_checkpoint, rerank_top_k



def adopt_stored_allocation(featurizer: Any, metadata: dict, layout: list | None) -> None:
    """A fresh TracIn (its factored projection not calibrated yet) takes a store's allocation (and row layout)."""
    stored = metadata.get("projection_allocation")
    if stored is not None and featurizer.needs_calibration:
        featurizer.adopt_projection(layout, stored)


class GradientIndex:
    """Stored training features (one FeatureStore) plus the TracIn that made them (for queries).

    Implements tracin_engine.interface.InfluenceIndex. `tracin` is the TracIn that built the store:
    it computes the query side (test_features) with the same checkpoints, layers and projection.
    """

    records_outputs = True  # featurization stores ||dl/df||^2 and losses per row (index.outliers(space="output"))

    def __init__(self, tracin: Any, store: FeatureStore):
        if not store.complete:
            missing = int((~store.done_mask).sum())
            raise TracInError(f"the index is incomplete ({missing} rows not featurized); run "
                              "tracin.index(data, store=path) again to resume.")
        self.tracin = tracin
        self.store = store
        self._on_device: dict[str, DeviceFeatures] = {}
        self._rerank_source: tuple | None = None      # (train_data, batch_fn, DataSource) last checked (rerank.py)
        self.last_rerank: dict | None = None          # what the last top_k(rerank=) rescored (rerank.py)
        self.check_projection()

    def __repr__(self) -> str:
        where = f"'{self.store.path}'" if self.store.path else "memory"
        return (f"GradientIndex(n_train={self.n_train}, checkpoints={self.store.n_checkpoints}, "
                f"dim={self.store.dim}, proj_dim={self.tracin.proj_dim}, store={where})")

    # -- facts ------------------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return self.store.n

    @property
    def n_checkpoints(self) -> int:
        """C: the number of checkpoints (terms of influence_per_checkpoint)."""
        return self.store.n_checkpoints

    @property
    def learning_rates(self) -> torch.Tensor:
        """Tensor (C,) float64: eta_c, the weight of checkpoint c."""
        return self.tracin.checkpoints.learning_rates

    @property
    def layout(self):
        """How a stored row represents a gradient (tracin_engine.store.layout.Layout)."""
        return self.tracin.featurizer.layout

    @property
    def device(self) -> torch.device:
        """Where queries compute: the TracIn's device."""
        return self.tracin.device

    def device_features(self, device: str | torch.device | None = None) -> DeviceFeatures:
        """The stored features as `device` (default: self.device) reads them, made once and kept:
        resident when they fit, else streamed (store/residency.py). Clustering reuses it."""
        device = torch.device(device) if device is not None else self.device
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = DeviceFeatures(self.store, device)
        return self._on_device[key]

    def features(self, c: int, out_device: str | torch.device | None = None) -> torch.Tensor:
        """Stored training features of checkpoint c: Tensor (n_train, dim), on the CPU (no copy for a
        CPU or memory-mapped store) or `out_device`."""
        return to_output(self.store.features(c), out_device)

    def test_features(self, test_data: Any, target: Target = "loss", batch_fn: BatchFn | None = None,
                      out_device: str | torch.device | None = None) -> torch.Tensor:
        """Query-side features of test examples, as every scoring method takes them: (C, m, dim), on the
        CPU (or `out_device`; out_device=index.device keeps them where queries compute).

        Compute once and pass as features= to query repeatedly (widgets do).
        """
        self.check_projection()
        return self.tracin.features(test_data, target=target, batch_fn=batch_fn, out_device=out_device)

    def row_layout(self) -> list | None:
        """The featurizer's row layout the stored rows were written in (Layout.to_dict()), to adopt."""
        return self.store.metadata.get("layout")

    def check_projection(self) -> None:
        """Give a TracIn that has not settled its factored allocation the stored one; TracInError when its
        allocation is another (another index was loaded into the same TracIn): test features would not
        match the stored rows."""
        stored = self.store.metadata.get("projection_allocation")
        fz = self.tracin.featurizer
        adopt_stored_allocation(fz, self.store.metadata, self.row_layout())
        now = fz.allocation
        if stored is not None and now is not None and [list(a) for a in stored] != now:
            raise TracInError("this index's rows were projected with another factored allocation than its "
                              "TracIn now uses (another index was loaded into the same TracIn); load each "
                              "index with its own TracIn object.")

    def query_features(self, test_data: Any = None, target: Target = "loss", batch_fn: BatchFn | None = None,
                       features: torch.Tensor | None = None) -> torch.Tensor:
        """`features` when given, else test_features(test_data, target, batch_fn): Tensor (C, m, dim)
        on the computing device (self.device); refused when their length is not the stored rows' dim."""
        if features is not None:
            return self._check_dim(features.to(self.device))
        if test_data is None:
            raise TracInError("pass test_data (or features= from index.test_features(...)).")
        try:
            t = self.test_features(test_data, target, batch_fn, out_device=self.device).to(self.device)
        except (RuntimeError, TracInError) as exc:  # other shape or dtype than the training examples?
            err = self.tracin.explain(exc, test_data, batch_fn, self.store.metadata.get("data"))
            if err is None:
                raise
            raise err from exc
        return self._check_dim(t)

    def _check_dim(self, t: torch.Tensor) -> torch.Tensor:
        if t.shape[-1] != self.store.dim:
            raise TracInError(
                f"query features have {t.shape[-1]} numbers per checkpoint but the stored rows have "
                f"{self.store.dim}: the rows were made with another feature layout (another proj_dim, "
                "layers= or projection, or a store filled before its TracIn had seen a batch, when tracin.dim "
                "is still provisional). Build the index with tracin.index(data), or reopen it with "
                "GradientIndex.load(path, tracin).")
        return t

    # -- queries ----------------------------------------------------------------------------------
    def _scores(self, t: torch.Tensor, weights: torch.Tensor, out_device: Any, **kw: Any) -> torch.Tensor:
        return full_scores(t, self.device_features(), weights, self.layout, tf32=self.tracin.tf32,
                           out_device=out_device, **kw)

    def influence(self, test_data: Any = None, target: Target = "loss", batch_fn: BatchFn | None = None,
                  *, features: torch.Tensor | None = None, out_device: str | torch.device | None = None
                  ) -> torch.Tensor:
        """TracInCP scores: Tensor (n_test, n_train) on the CPU (or out_device); positive = proponent
        (lowered the test loss)."""
        t = self.query_features(test_data, target, batch_fn, features)
        return self._scores(t, self.learning_rates, out_device)

    def influence_per_checkpoint(self, test_data: Any = None, target: Target = "loss",
                                 batch_fn: BatchFn | None = None, *, features: torch.Tensor | None = None,
                                 out_device: str | torch.device | None = None) -> torch.Tensor:
        """Per-checkpoint terms eta_c <g_c(z), g_c(z')>: Tensor (C, n_test, n_train) on the CPU (or
        out_device); sums to influence."""
        t = self.query_features(test_data, target, batch_fn, features)
        return self._scores(t, self.learning_rates, out_device, per_checkpoint=True)

    def top_k(self, test_data: Any = None, k: int = 10, target: Target = "loss",
              batch_fn: BatchFn | None = None, *, features: torch.Tensor | None = None,
              block_size: int | None = None, test_chunk: int = 1024,
              out_device: str | torch.device | None = None, rerank: int | str | None = None,
              train_data: Any = None, train_batch_fn: BatchFn | None = None) -> TopK:
        """k proponents (highest scores) and k opponents (lowest) per test example, streamed over blocks.

        Returns TopK: .proponents.indices / .scores (n_test, k), best first; .opponents likewise,
        most negative first; on the CPU (or out_device). Memory stays bounded: test examples go in
        chunks of `test_chunk`, training rows in blocks of `block_size` (default: the block's scores
        and features within the device's budget, scoring.default_block_size).

        rerank=M (a projected index, with train_data= the data it was built from): the M best
        candidates each way by the projected scores are rescored with exact gradients and the k best
        by exact scores returned; rerank="auto" rescores as many as the projection's error leaves in
        doubt (rerank.py). Every returned score is then exact TracInCP; last_rerank says how many
        examples were rescored. An exact index's scores are exact already: rerank changes nothing.
        """
        k = check_k(k)
        if rerank is not None and self.tracin.proj_dim:
            return rerank_top_k(self, test_data, train_data, k, rerank, target, batch_fn, train_batch_fn,
                                features).to(output_device(out_device))
        t = self.query_features(test_data, target, batch_fn, features)
        feats = self.device_features()
        parts = [streaming_top_k(score_blocks(t[:, s:s + test_chunk], feats, self.learning_rates,
                                              self.layout, block_size=block_size, tf32=self.tracin.tf32), k)
                 for s in range(0, t.shape[1], test_chunk)]
        return (parts[0] if len(parts) == 1 else TopK.concat(parts)).to(output_device(out_device))

    def exact_influence_per_checkpoint(self, test_data: Any, train_data: Any, rows: Any,
                                       target: Target = "loss", batch_fn: BatchFn | None = None,
                                       train_batch_fn: BatchFn | None = None) -> torch.Tensor:
        """Exact terms eta_c <g_c(z), g_c(z')> against the training examples at `rows` (indices into
        train_data, the data the index was built from), from recomputed exact gradients whatever the
        index's projection: Tensor (C, m, len(rows)) float64 on the CPU (rerank.py)."""
        return exact_influence_per_checkpoint(self, test_data, train_data, rows, target, batch_fn, train_batch_fn)

    def similarity(self, test_data: Any = None, target: Target = "loss", batch_fn: BatchFn | None = None,
                   *, features: torch.Tensor | None = None, out_device: str | torch.device | None = None
                   ) -> torch.Tensor:
        """lr-weighted mean cosine of gradients: Tensor (n_test, n_train) in [-1, 1], on the CPU (or out_device)."""
        t = self.query_features(test_data, target, batch_fn, features)
        w = self.learning_rates / self.learning_rates.sum()
        return self._scores(t, w, out_device, normalize=True)

    def self_influence(self, weights: torch.Tensor | None = None, *,
                       out_device: str | torch.device | None = None) -> torch.Tensor:
        """sum_c eta_c ||g_c(z)||^2 for every training example: Tensor (n_train,) float64, on the CPU
        (or out_device).

        weights: (C,) to replace the learning rates (e.g. one-hot to look at a single checkpoint).
        """
        return to_output(self_influence(self.store, self._weights(weights)), out_device)

    def self_influence_per_checkpoint(self, weights: torch.Tensor | None = None, *,
                                      out_device: str | torch.device | None = None) -> torch.Tensor:
        """Terms eta_c ||g_c(z)||^2: Tensor (C, n_train) float64; sums to self_influence(). On the CPU
        (or out_device)."""
        return to_output(self_influence(self.store, self._weights(weights), per_checkpoint=True), out_device)

    def _weights(self, weights: torch.Tensor | None) -> torch.Tensor:
        if weights is None:
            return self.learning_rates
        weights = torch.as_tensor(weights, dtype=torch.float64).cpu()
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
                           batch_fn: BatchFn | None = None, *, features: torch.Tensor | None = None,
                           out_device: str | torch.device | None = None) -> TopK:
        """Proponents / opponents by ReTrac-style scores sum_c eta_c <g_c(z'), g_c(z)> / |g_c(z)|
        (on the CPU or out_device)."""
        from ..analysis.outliers import renormalized_top_k

        return renormalized_top_k(self, test_data, k, target, batch_fn, features=features, out_device=out_device)

    # -- persistence ------------------------------------------------------------------------------
    def metadata(self) -> dict:
        """What identifies this index (written to metadata.json by save): its store's metadata
        (training data fingerprint, shape) with the TracIn's settings and checkpoints."""
        return {**self.store.metadata, **self.tracin.metadata()}

    def _write_files(self, folder: Path) -> None:
        """Write the index into the new folder `folder` (save() renames it into place)."""
        self.store.copy_to(folder, self.metadata())

    def save(self, path: str | Path) -> Path:
        """Write the index to folder `path` (memory-mapped on reopen). Returns the path.

        `path` must be new, an empty folder, or a store saved before (its metadata.json and only store
        files inside): anything else is refused, never deleted. The index is written into a folder
        beside `path`, then renamed into place, so `path` never holds half an index.
        """
        path = Path(path)
        if self.store.path is not None and Path(self.store.path).resolve() == path.resolve():
            return path
        old = files.replaceable(path)
        tmp = path.parent / f".{path.name}.saving-{uuid.uuid4().hex[:8]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._write_files(tmp)
        except BaseException:
            files.remove_store(tmp)
            raise
        if old:
            trash = path.parent / f".{path.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(path, trash)
            os.rename(tmp, path)
            files.remove_store(trash)
        else:
            if path.exists():
                path.rmdir()  # empty
            os.rename(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path, tracin: Any, train_data: Any = None,
             batch_fn: BatchFn | None = None) -> "GradientIndex":
        """Reopen a saved index read-only; its metadata must match `tracin` (model, checkpoints and
        their contents, proj_dim, ...) and, when given, `train_data` (examples, labels, order)."""
        store = FeatureStore.load(path)
        tracin.featurizer.adopt(store.metadata.get("per_example", "vmap"), store.metadata.get("layout"),
                                store.metadata.get("projection_allocation"))
        wanted = tracin.metadata()
        if train_data is not None:
            wanted["data"] = data_fingerprint(as_source(train_data, batch_fn))
        compare_metadata(store.metadata, wanted, Path(path))
        return cls(tracin, store)

