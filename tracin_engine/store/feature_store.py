"""Storage of the gradient index: features, squared norms and a done-mask, in memory or on disk.

Layout on disk (one folder; files handled by store/files.py):
    metadata.json            what built it: model architecture, checkpoints (name, lr, step, content
                             digest of their tensors), training data (n, content digest), proj_dim, seed,
                             n, dim, dtype; checked again when the folder is reopened
    features_<c>.bin         raw (n, dim) array of checkpoint c, memory-mapped, dtype float16/bfloat16/float32
    sq_norms.npy             (n_checkpoints, n) float64: ||g_c(z)||^2 of the features before rounding
    out_sq_norms.npy         (n_checkpoints, n) float64: ||dl/df||^2, the loss gradient w.r.t. the model
                             output f at checkpoint c (NaN where not recorded)
    losses.npy               (n_checkpoints, n) float64: the objective l(w_c, z) (NaN where not recorded)
    done.npy                 (n_checkpoints, n) uint8: 1 once row z of checkpoint c is written and flushed
    .lock                    held (flock) by the process featurizing into the folder
Rows are flushed before their done flag, so an interrupted run loses nothing it marked done.
A store is created only in a new or empty folder, every file reserved on disk first (a full disk is
an OSError at creation, never a SIGBUS later), metadata.json written last. Opening checks every
file's size, dtype and shape against the metadata; queries open files read-only, featurizing opens
them for writing under the lock (FeatureStore.open(path, writable=True)).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..buffers import zeros_output
from ..errors import TracInError
from ..resources import check_disk, check_memory, format_bytes
from . import files

_DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.uint16),
           "float32": (torch.float32, np.float32), "float64": (torch.float64, np.float64)}
_OUTPUTS = ("out_sq_norms", "losses")


def dtype_name(dtype: torch.dtype) -> str:
    for name, (td, _) in _DTYPES.items():
        if td == dtype:
            return name
    raise TracInError(f"unsupported store dtype {dtype}; use one of {list(_DTYPES)}.")


def store_bytes(n: int, n_checkpoints: int, dim: int, dtype: torch.dtype) -> int:
    """Bytes of a store: n x checkpoints x (dim x itemsize + 3 float64 + 1 flag)."""
    return n * n_checkpoints * (dim * torch.empty((), dtype=dtype).element_size() + 25)


def _describe(n: int, n_checkpoints: int, dim: int, dtype: torch.dtype) -> str:
    item = torch.empty((), dtype=dtype).element_size()
    return (f"{n} examples x {n_checkpoints} checkpoints x {dim} values x {item} bytes "
            f"({dtype_name(dtype)}) = {format_bytes(n * n_checkpoints * dim * item)} of features")


def _tensor(mm: np.ndarray, tdtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(mm)
    return t.view(tdtype) if tdtype == torch.bfloat16 else t


def compare_metadata(stored: dict, wanted: dict, path: Path) -> None:
    """Raise TracInError naming every key of `wanted` whose stored value differs (checkpoints one by
    one, the training data by n and content digest). Stores from before content digests: a warning."""
    wanted = json.loads(json.dumps(wanted))  # as it would be stored (tuples -> lists, ...)
    problems, unverified = [], []
    for key, now in wanted.items():
        old = stored.get(key)
        if key == "data" and old is None:
            unverified.append("the training data")
        elif key == "data" and old != now:
            problems.append(f"training data: stored {old.get('n')} examples (digest {old.get('digest')}), now "
                            f"{now.get('n')} examples (digest {now.get('digest')}): other examples, labels or order")
        elif key == "checkpoints" and isinstance(old, list) and len(old) == len(now):
            for c, (a, b) in enumerate(zip(old, now)):
                if "digest" not in a:
                    unverified.append(f"checkpoint {c}")
                diff = [f"{k}: stored {a.get(k)!r}, now {v!r}" for k, v in b.items()
                        if k in a and a[k] != v]
                if diff:
                    problems.append(f"checkpoint {c} ({b.get('name')}): " + ", ".join(diff)
                                    + (" (other weights)" if a.get("digest") != b.get("digest") else ""))
        elif old != now:
            problems.append(f"{key}: stored {old!r}, now {now!r}")
    if problems:
        raise TracInError(f"the index at {path} was built from something else: " + "; ".join(problems)
                          + ". Pass another store path, or delete the folder to rebuild it.")
    if unverified:
        warnings.warn(f"the index at {path} was written before content fingerprints were recorded: "
                      f"{', '.join(unverified)} cannot be verified. Rebuild it to have them checked.", stacklevel=3)


class FeatureStore:
    """features(c): Tensor (n, dim); sq_norms, out_sq_norms, losses: Tensor (C, n) float64;
    done_mask: Tensor (C, n) bool.

    FeatureStore(n, C, dim, dtype) holds them in memory (refused up front when they cannot fit);
    FeatureStore(n, C, dim, dtype, path=folder, metadata=...) creates a store in a new or empty
    folder; FeatureStore.open / load / open_or_create reopen one.
    """

    def __init__(self, n: int, n_checkpoints: int, dim: int, dtype: torch.dtype,
                 path: Path | str | None = None, metadata: dict | None = None):
        self.n, self.n_checkpoints, self.dim, self.dtype = n, n_checkpoints, dim, dtype
        self.path = None if path is None else Path(path)
        self.metadata = {**(metadata or {}), "n": n, "n_checkpoints": n_checkpoints, "dim": dim,
                         "dtype": dtype_name(dtype)}
        self.writable, self._lock, self._maps = True, None, []
        if self.path is None:
            check_memory(store_bytes(n, n_checkpoints, dim, dtype),
                         f"an in-memory index of {_describe(n, n_checkpoints, dim, dtype)}")
            self._features = [zeros_output((n, dim), dtype, torch.device("cpu")) for _ in range(n_checkpoints)]
            self.sq_norms = torch.zeros(n_checkpoints, n, dtype=torch.float64)
            self.out_sq_norms = torch.full((n_checkpoints, n), float("nan"), dtype=torch.float64)
            self.losses = torch.full((n_checkpoints, n), float("nan"), dtype=torch.float64)
            self._done_u8 = torch.zeros(n_checkpoints, n, dtype=torch.uint8)
        else:
            self._create()

    # -- disk -------------------------------------------------------------------------------------
    def _create(self) -> None:
        """Create the files in self.path (new, empty, or left by an interrupted creation)."""
        p = self.path
        made_folder = not p.exists()
        if not made_folder:
            if not p.is_dir():
                raise TracInError(f"{p} exists and is not a folder; pass a new or empty folder as store.")
            if os.path.lexists(p / files.METADATA):
                raise TracInError(f"{p} already holds a store; open it with FeatureStore.open or pass another folder.")
            others = [e.name for e in os.scandir(p) if not files.is_store_file(e.name)]
            if others:
                raise TracInError(f"{p} is not empty (it holds {sorted(others)[:5]}); a store is only created in a "
                                  "new or empty folder, never over your files. Pass another folder.")
        check_disk(store_bytes(self.n, self.n_checkpoints, self.dim, self.dtype), p,
                   f"a store of {_describe(self.n, self.n_checkpoints, self.dim, self.dtype)}")
        p.mkdir(parents=True, exist_ok=True)
        self._lock = files.WriterLock(p)
        leftovers = [e.name for e in os.scandir(p) if e.name != files.LOCK]  # an interrupted creation: ours
        created = []
        try:
            for name in leftovers:
                files.check_regular(p / name)
                (p / name).unlink()
            tdtype, ndtype = _DTYPES[dtype_name(self.dtype)]
            shape = (self.n_checkpoints, self.n)
            feats = []
            for c in range(self.n_checkpoints):
                created.append(p / f"features_{c:03d}.bin")
                self._maps.append(files.create_raw(created[-1], ndtype, (self.n, self.dim)))
                feats.append(_tensor(self._maps[-1], tdtype))
            arrays = []
            for name, dt, fill in (("sq_norms", np.float64, 0), ("out_sq_norms", np.float64, np.nan),
                                   ("losses", np.float64, np.nan), ("done", np.uint8, 0)):
                created.append(p / f"{name}.npy")
                arrays.append(files.create_npy(created[-1], dt, shape, fill))
            files.write_metadata(p, self.metadata)
        except BaseException:
            self._maps = []
            for f in created:
                if f.exists():
                    f.unlink()
            self._lock.release()
            if made_folder:
                (p / files.LOCK).unlink(missing_ok=True)
                p.rmdir()
            raise
        self._adopt(feats, arrays)

    def _adopt(self, feats: list[torch.Tensor], arrays: list[Any]) -> None:
        self._features = feats
        self._maps += [a for a in arrays if isinstance(a, np.memmap)]
        norms, outs, losses, done = (torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in arrays)
        self.sq_norms, self.out_sq_norms, self.losses, self._done_u8 = norms, outs, losses, done

    @classmethod
    def open(cls, path: str | Path, writable: bool = False, shared_lock: bool = False) -> "FeatureStore":
        """Reopen a store folder, every file checked against metadata.json (size, dtype, shape; no
        symbolic links). writable=False: mapped read-only (copy-on-write; a read-only folder works);
        writable=True: for featurizing, under the folder's lock (shared_lock: the ranks of one
        distributed run), missing output arrays created as NaN. Call finish_writing() when done."""
        path = Path(path)
        meta = files.read_metadata(path)
        if meta["dtype"] not in _DTYPES:
            raise files.damaged(path / files.METADATA, f"has dtype={meta['dtype']!r}")
        self = cls.__new__(cls)
        self.n, self.n_checkpoints, self.dim = meta["n"], meta["n_checkpoints"], meta["dim"]
        tdtype, ndtype = _DTYPES[meta["dtype"]]
        self.dtype, self.path, self.metadata = tdtype, path, meta
        self.writable, self._lock, self._maps = writable, None, []
        if writable:
            self._lock = files.WriterLock(path, shared=shared_lock)
        try:
            feats = []
            for c in range(self.n_checkpoints):
                self._maps.append(files.open_raw(path / f"features_{c:03d}.bin", ndtype, (self.n, self.dim), writable))
                feats.append(_tensor(self._maps[-1], tdtype))
            shape = (self.n_checkpoints, self.n)
            arrays = []
            for name, dt in (("sq_norms", np.float64), *((o, np.float64) for o in _OUTPUTS), ("done", np.uint8)):
                f = path / f"{name}.npy"
                if name in _OUTPUTS and not os.path.lexists(f):  # a store from before these were recorded
                    arrays.append(files.create_npy(f, dt, shape, np.nan) if writable
                                  else torch.full(shape, float("nan"), dtype=torch.float64))
                else:
                    arrays.append(files.open_npy(f, dt, shape, writable))
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        self._adopt(feats, arrays)
        return self

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStore":
        """Reopen a store folder read-only, as it is (metadata.json tells its shape)."""
        return cls.open(path)

    @staticmethod
    def stored_metadata(path: str | Path) -> dict | None:
        """The metadata.json of a store at `path` (a TracInError if damaged), None when there is none."""
        path = Path(path)
        return files.read_metadata(path) if os.path.lexists(path / files.METADATA) else None

    @classmethod
    def open_or_create(cls, path: str | Path, n: int, n_checkpoints: int, dim: int, dtype: torch.dtype,
                       metadata: dict, shared_lock: bool = False) -> "FeatureStore":
        """For featurizing: reopen `path` for writing if it was built from the same things (resume;
        any difference is a TracInError naming it), else create it in a new or empty folder."""
        path = Path(path)
        meta = {**metadata, "n": n, "n_checkpoints": n_checkpoints, "dim": dim, "dtype": dtype_name(dtype)}
        if os.path.lexists(path / files.METADATA):
            compare_metadata(files.read_metadata(path), meta, path)
            return cls.open(path, writable=True, shared_lock=shared_lock)
        return cls(n, n_checkpoints, dim, dtype, path, meta)

    @staticmethod
    def check_fits(n: int, n_checkpoints: int, dim: int, dtype: torch.dtype, path: str | Path | None) -> None:
        """Before allocating: TracInError when an in-memory store (path None) exceeds the available
        memory, or a new store at `path` the free disk (an existing store needs no more space)."""
        what = _describe(n, n_checkpoints, dim, dtype)
        if path is None:
            check_memory(store_bytes(n, n_checkpoints, dim, dtype), f"an in-memory index of {what}")
        elif not os.path.lexists(Path(path) / files.METADATA):
            check_disk(store_bytes(n, n_checkpoints, dim, dtype), path, f"a store of {what}")

    @classmethod
    def open_complete(cls, path: str | Path, n: int, n_checkpoints: int, dim: int, dtype: torch.dtype,
                      metadata: dict) -> "FeatureStore | None":
        """The store at `path`, read-only, if it exists, was built from the same things (else a
        TracInError naming the difference) and is complete with output norms; else None."""
        path = Path(path)
        if not os.path.lexists(path / files.METADATA):
            return None
        meta = {**metadata, "n": n, "n_checkpoints": n_checkpoints, "dim": dim, "dtype": dtype_name(dtype)}
        compare_metadata(files.read_metadata(path), meta, path)
        fs = cls.open(path)
        recorded = not (fs.out_sq_norms.isnan().any() or fs.losses.isnan().any())
        return fs if fs.complete and recorded else None

    def finish_writing(self) -> None:
        """Flush every file and release the writer lock; the store stays readable, further writes
        are refused."""
        for m in self._maps:
            m.flush()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self.path is not None:
            self.writable = False

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

    def _check_writable(self) -> None:
        if not self.writable:
            raise TracInError(f"the store at {self.path} is open read-only; featurize with "
                              "tracin.index(data, store=path) to write to it.")

    def redo_rows_without_outputs(self, lo: int = 0, hi: int | None = None) -> int:
        """Mark rows lo..hi-1 written without output norms or losses (NaN) as not done, so that
        featurizing again computes them (a store from before these were recorded). Returns how many."""
        done = self._done_u8[:, lo:hi]
        missing = (done == 1) & (self.out_sq_norms[:, lo:hi].isnan() | self.losses[:, lo:hi].isnan())
        count = int(missing.sum())
        if count:
            self._check_writable()
            done[missing] = 0
            if self._maps:
                self._maps[-1].flush()
        return count

    def destination(self, c: int, start: int, stop: int) -> torch.Tensor | None:
        """A view (stop - start, dim) of checkpoint c's rows start..stop for a featurizer to fill in place
        (write() then stores them without a copy), or None: a read-only store, a non-contiguous view, or
        a range holding rows already written (those are never touched until new rows are complete)."""
        if not self.writable or bool(self._done_u8[c, start:stop].any()):
            return None
        view = self._features[c][start:stop]
        return view if view.is_contiguous() else None

    def write(self, c: int, start: int, feats: torch.Tensor, sq_norms: torch.Tensor | None = None,
              out_sq_norms: torch.Tensor | None = None, losses: torch.Tensor | None = None) -> None:
        """Store rows start..start+B of checkpoint c. feats: (B, dim), float32 or float64.

        sq_norms: (B,) squared norms of the gradients the rows represent (default: sum of squares).
        out_sq_norms, losses: (B,) output-gradient squared norms and objectives (left NaN if None).
        """
        self._check_writable()
        stop = start + feats.shape[0]
        feats = feats.detach().cpu()
        if self.dtype == torch.float16 and feats.abs().max() > torch.finfo(torch.float16).max:
            raise TracInError("gradient features overflow float16 (values above 65504); "
                              "build the index with dtype=torch.bfloat16 or torch.float32.")
        dst = self._features[c][start:stop]
        if not (feats.data_ptr() == dst.data_ptr() and feats.dtype == dst.dtype and feats.shape == dst.shape
                and feats.stride() == dst.stride()):             # else filled in place (destination())
            dst.copy_(feats)
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
        out.writable, out._lock = True, None
        out._features = [f.to(device) for f in self._features]
        out.sq_norms, out._done_u8 = self.sq_norms.clone(), self._done_u8.clone()
        out.out_sq_norms, out.losses = self.out_sq_norms.clone(), self.losses.clone()
        return out

    def copy_to(self, path: str | Path, metadata: dict) -> "FeatureStore":
        """A complete copy of this store in folder `path` (new or empty), read-only once written."""
        dst = FeatureStore(self.n, self.n_checkpoints, self.dim, self.dtype, path, metadata)
        try:
            for c in range(self.n_checkpoints):
                dst._features[c][:] = self._features[c]
            dst.sq_norms[:] = self.sq_norms
            dst.out_sq_norms[:] = self.out_sq_norms
            dst.losses[:] = self.losses
            dst._done_u8[:] = self._done_u8
        finally:
            dst.finish_writing()
        return dst
