"""Storage of the gradient index: features, squared norms and a done-mask, in memory or on disk.

Layout on disk (one folder):
    metadata.json            what built it (model fingerprint, checkpoints, lrs, proj_dim, seed, n, dim,
                             dtype); checked again when the folder is reopened
    features_<c>.bin         raw (n, dim) array of checkpoint c, memory-mapped, dtype float16/bfloat16/float32
    sq_norms.npy             (n_checkpoints, n) float64: ||g_c(z)||^2 of the features before rounding
    out_sq_norms.npy         (n_checkpoints, n) float64: ||dl/df||^2, the loss gradient w.r.t. the model
                             output f at checkpoint c (NaN where not recorded)
    losses.npy               (n_checkpoints, n) float64: the objective l(w_c, z) (NaN where not recorded)
    done.npy                 (n_checkpoints, n) uint8: 1 once row z of checkpoint c is written and flushed
Rows are flushed before their done flag, so an interrupted run loses nothing it marked done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TracInError

_DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.uint16),
           "float32": (torch.float32, np.float32), "float64": (torch.float64, np.float64)}


def dtype_name(dtype: torch.dtype) -> str:
    for name, (td, _) in _DTYPES.items():
        if td == dtype:
            return name
    raise TracInError(f"unsupported store dtype {dtype}; use one of {list(_DTYPES)}.")


def _open_nan_map(path: Path, shape: tuple[int, int], create: bool) -> np.ndarray:
    """A float64 .npy memory map; (re)created filled with NaN ("not recorded") when `create` or missing
    (a store written before these arrays existed)."""
    if path.exists() and not create:
        mm = np.lib.format.open_memmap(path, mode="r+")
        if mm.shape != shape or mm.dtype != np.float64:
            raise TracInError(f"{path} holds a {mm.dtype} array of shape {mm.shape}, expected float64 {shape}; "
                              "the store folder is damaged: delete it to rebuild the index.")
        return mm
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=shape)
    mm[:] = np.nan
    return mm


class FeatureStore:
    """features(c): Tensor (n, dim); sq_norms, out_sq_norms, losses: Tensor (C, n) float64;
    done_mask: Tensor (C, n) bool."""

    def __init__(self, n: int, n_checkpoints: int, dim: int, dtype: torch.dtype,
                 path: Path | None = None, metadata: dict | None = None):
        self.n, self.n_checkpoints, self.dim, self.dtype = n, n_checkpoints, dim, dtype
        self.path = path
        self.metadata = dict(metadata or {})
        self._maps: list[Any] = []
        if path is None:
            self._features = [torch.zeros(n, dim, dtype=dtype) for _ in range(n_checkpoints)]
            self.sq_norms = torch.zeros(n_checkpoints, n, dtype=torch.float64)
            self.out_sq_norms = torch.full((n_checkpoints, n), float("nan"), dtype=torch.float64)
            self.losses = torch.full((n_checkpoints, n), float("nan"), dtype=torch.float64)
            self._done_u8 = torch.zeros(n_checkpoints, n, dtype=torch.uint8)
        else:
            self._open_files(create=not (path / "metadata.json").exists())

    # -- disk -------------------------------------------------------------------------------------
    def _open_files(self, create: bool) -> None:
        p = self.path
        p.mkdir(parents=True, exist_ok=True)
        tdtype, ndtype = _DTYPES[dtype_name(self.dtype)]
        mode = "w+" if create else "r+"
        feats = []
        for c in range(self.n_checkpoints):
            mm = np.memmap(p / f"features_{c:03d}.bin", dtype=ndtype, mode=mode, shape=(self.n, self.dim))
            self._maps.append(mm)
            t = torch.from_numpy(mm)
            feats.append(t.view(tdtype) if tdtype == torch.bfloat16 else t)
        open_mm = np.lib.format.open_memmap
        norms = open_mm(p / "sq_norms.npy", mode=mode, dtype=np.float64, shape=(self.n_checkpoints, self.n))
        outputs = [_open_nan_map(p / f"{name}.npy", (self.n_checkpoints, self.n), create)
                   for name in ("out_sq_norms", "losses")]
        done = open_mm(p / "done.npy", mode=mode, dtype=np.uint8, shape=(self.n_checkpoints, self.n))
        self._maps += [norms, *outputs, done]
        self._features = feats
        self.sq_norms = torch.from_numpy(norms)
        self.out_sq_norms, self.losses = (torch.from_numpy(m) for m in outputs)
        self._done_u8 = torch.from_numpy(done)
        if create:
            (p / "metadata.json").write_text(json.dumps(self.metadata, indent=1, sort_keys=True))

    @classmethod
    def open_or_create(cls, path: str | Path, n: int, n_checkpoints: int, dim: int, dtype: torch.dtype,
                       metadata: dict) -> "FeatureStore":
        """Reopen `path` if it was built with the same metadata (resume), else create it."""
        path = Path(path)
        meta_file = path / "metadata.json"
        meta = {**metadata, "n": n, "n_checkpoints": n_checkpoints, "dim": dim, "dtype": dtype_name(dtype)}
        if meta_file.exists():
            old = json.loads(meta_file.read_text())
            diff = {k: (old.get(k), v) for k, v in json.loads(json.dumps(meta)).items() if old.get(k) != v}
            if diff:
                raise TracInError(
                    f"the index at {path} was built with other settings: "
                    + "; ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in diff.items())
                    + ". Pass another store path, or delete the folder to rebuild it.")
        return cls(n, n_checkpoints, dim, dtype, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStore":
        """Reopen a store folder as it is (metadata.json tells its shape)."""
        path = Path(path)
        meta_file = path / "metadata.json"
        if not meta_file.exists():
            raise TracInError(f"{path} holds no metadata.json; is it a folder written by tracin.index(store=...)?")
        meta = json.loads(meta_file.read_text())
        return cls(meta["n"], meta["n_checkpoints"], meta["dim"], _DTYPES[meta["dtype"]][0], path, meta)

    # -- access -----------------------------------------------------------------------------------
    @property
    def done_mask(self) -> torch.Tensor:
        """Tensor (C, n) bool: which rows are written."""
        return self._done_u8.bool()

    def features(self, c: int) -> torch.Tensor:
        """Tensor (n, dim) of checkpoint c (a view of the memory map when on disk)."""
        return self._features[c]

    def is_done(self, c: int, start: int, stop: int) -> bool:
        return bool(self._done_u8[c, start:stop].all())

    @property
    def complete(self) -> bool:
        return bool(self.done_mask.all())

    def redo_rows_without_outputs(self, lo: int = 0, hi: int | None = None) -> int:
        """Mark rows lo..hi-1 written without output norms or losses (NaN) as not done, so that
        featurizing again computes them (a store from before these were recorded). Returns how many."""
        done = self._done_u8[:, lo:hi]
        missing = (done == 1) & (self.out_sq_norms[:, lo:hi].isnan() | self.losses[:, lo:hi].isnan())
        count = int(missing.sum())
        if count:
            done[missing] = 0
            if self._maps:
                self._maps[-1].flush()
        return count

    def write(self, c: int, start: int, feats: torch.Tensor, sq_norms: torch.Tensor | None = None,
              out_sq_norms: torch.Tensor | None = None, losses: torch.Tensor | None = None) -> None:
        """Store rows start..start+B of checkpoint c. feats: (B, dim), float32 or float64.

        sq_norms: (B,) squared norms of the gradients the rows represent (default: sum of squares).
        out_sq_norms, losses: (B,) output-gradient squared norms and objectives (left NaN if None).
        """
        stop = start + feats.shape[0]
        feats = feats.detach().cpu()
        if self.dtype == torch.float16 and feats.abs().max() > torch.finfo(torch.float16).max:
            raise TracInError("gradient features overflow float16 (values above 65504); "
                              "build the index with dtype=torch.bfloat16 or torch.float32.")
        self._features[c][start:stop] = feats.to(self.dtype)
        self.sq_norms[c, start:stop] = (feats.double().pow(2).sum(1) if sq_norms is None
                                        else sq_norms.detach().cpu().double())
        for dst, src in ((self.out_sq_norms, out_sq_norms), (self.losses, losses)):
            if src is not None:
                dst[c, start:stop] = src.detach().cpu().double()
        if self.path is None:
            self._done_u8[c, start:stop] = 1
            return
        for m in (self._maps[c], *self._maps[self.n_checkpoints:-1]):  # rows, then norms and outputs
            m.flush()
        self._done_u8[c, start:stop] = 1
        self._maps[-1].flush()

    def resident(self, device: str | torch.device) -> "FeatureStore":
        """An in-memory copy whose features live on `device` (e.g. "cuda"), for fast queries.

        Example: GradientIndex(tracin, index.store.resident("cuda")). Norms and done flags stay on the CPU.
        """
        out = FeatureStore.__new__(FeatureStore)
        out.n, out.n_checkpoints, out.dim, out.dtype = self.n, self.n_checkpoints, self.dim, self.dtype
        out.path, out.metadata, out._maps = None, dict(self.metadata), []
        out._features = [f.to(device) for f in self._features]
        out.sq_norms, out._done_u8 = self.sq_norms.clone(), self._done_u8.clone()
        out.out_sq_norms, out.losses = self.out_sq_norms.clone(), self.losses.clone()
        return out

    def copy_to(self, path: str | Path, metadata: dict) -> "FeatureStore":
        """A complete copy of this store in folder `path` (created fresh)."""
        dst = FeatureStore.open_or_create(path, self.n, self.n_checkpoints, self.dim, self.dtype, metadata)
        for c in range(self.n_checkpoints):
            dst._features[c][:] = self._features[c]
        dst.sq_norms[:] = self.sq_norms
        dst.out_sq_norms[:] = self.out_sq_norms
        dst.losses[:] = self.losses
        dst._done_u8[:] = self._done_u8
        for m in dst._maps:
            m.flush()
        return dst
