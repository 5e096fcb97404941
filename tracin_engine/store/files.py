"""The files of an on-disk store: created beside nothing else, validated on open, never followed
through symbolic links, never extended by opening, fully reserved on disk before use.

Why: a memory map over a sparse file kills the process with SIGBUS when the disk fills up at a
write; reserving every block when a file is created (posix_fallocate, or zeros where the
filesystem cannot) turns that into an OSError naming the file and the bytes. np.memmap opened
"r+" silently zero-extends a short file; sizes are therefore checked first. Readers map files
copy-on-write ("c": the file is opened read-only, so a read-only store can be queried).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TracInError

METADATA = "metadata.json"
LOCK = ".lock"
_STORE_FILE = re.compile(r"^(features_\d{3,}\.bin|(sq_norms|out_sq_norms|losses|done|source_self_influence)\.npy|"
                         r"metadata\.json|\.lock|\.metadata\.json\.tmp)$")
_ZEROS = 1 << 22


def is_store_file(name: str) -> bool:
    """Whether `name` is a file name a store folder holds (features_<c>.bin, the .npy arrays, ...)."""
    return bool(_STORE_FILE.match(name))


def damaged(path: Path, problem: str) -> TracInError:
    return TracInError(f"{path} {problem}; the store folder is damaged. Delete the folder (or pass "
                       "another store path) to rebuild the index.")


def check_regular(path: Path) -> None:
    """Refuse a symbolic link or anything but a regular file (writes must not reach another file)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise TracInError(f"{path} is a symbolic link; a store's files must be regular files inside the "
                          "store folder (refused, so that writes cannot reach another file).")
    if not stat.S_ISREG(st.st_mode):
        raise damaged(path, "is not a regular file")


def read_metadata(folder: Path) -> dict:
    """metadata.json of a store as a dict (with n, n_checkpoints, dim, dtype); TracInError if absent
    or damaged."""
    path = folder / METADATA
    if not os.path.lexists(path):
        raise TracInError(f"{folder} holds no {METADATA}; is it a folder written by tracin.index(store=...) "
                          "or index.save(...)?")
    check_regular(path)
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise damaged(path, f"is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise damaged(path, "does not hold a JSON object")
    for key in ("n", "n_checkpoints", "dim"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 1:
            raise damaged(path, f"has {key}={meta.get(key)!r}, not a positive integer")
    if not isinstance(meta.get("dtype"), str):
        raise damaged(path, f"has dtype={meta.get('dtype')!r}")
    return meta


def write_metadata(folder: Path, meta: dict) -> None:
    """Write metadata.json atomically (a temporary file beside it, then a rename)."""
    tmp = folder / ".metadata.json.tmp"
    if os.path.lexists(tmp):
        check_regular(tmp)
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(meta, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / METADATA)


def reserve(fd: int, nbytes: int, path: Path) -> None:
    """Make every byte of the file's first `nbytes` allocated on disk (no holes), or raise OSError
    naming `path` and the bytes needed."""
    if nbytes == 0:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise OSError(exc.errno, f"could not reserve {nbytes} bytes on disk for {path}: {exc.strerror}. "
                                     "Free disk space (or choose another store folder) and run again: "
                                     "the store resumes", str(path)) from None
    size = os.fstat(fd).st_size  # the filesystem cannot reserve: write zeros (holes of a sparse file too)
    try:
        for start in range(0, nbytes, _ZEROS):
            stop = min(nbytes, start + _ZEROS)
            if start >= size:
                os.pwrite(fd, bytes(stop - start), start)
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"could not write {nbytes} bytes to {path}: {exc.strerror}. Free disk space "
                                 "and run again: the store resumes", str(path)) from None


def _open_fd(path: Path, writable: bool) -> int:
    check_regular(path)
    return os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW)


def _map(fd: int, dtype: Any, shape: tuple[int, ...], writable: bool, offset: int = 0) -> np.memmap:
    with os.fdopen(fd, "r+b" if writable else "rb") as f:
        return np.memmap(f, dtype=dtype, mode="r+" if writable else "c", shape=shape, offset=offset)


def create_raw(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new file (must not exist) of prod(shape) values, reserved on disk and zero-filled: a map."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        reserve(fd, nbytes, path)
    except BaseException:
        os.close(fd)
        raise
    return _map(fd, dtype, shape, True)


def open_raw(path: Path, dtype: Any, shape: tuple[int, ...], writable: bool) -> np.memmap:
    """Map an existing raw file whose size must be exactly prod(shape) values of `dtype`."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not os.path.lexists(path):
        raise damaged(path, "is missing")
    fd = _open_fd(path, writable)
    try:
        size = os.fstat(fd).st_size
        if size != nbytes:
            raise damaged(path, f"has {size} bytes, expected {nbytes} ({np.dtype(dtype).name} array of shape {shape})")
        if writable:
            reserve(fd, nbytes, path)  # fills the holes of a sparse file (one written by an older version)
    except BaseException:
        os.close(fd)
        raise
    return _map(fd, dtype, shape, writable)


def _npy_header(dtype: Any, shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


def create_npy(path: Path, dtype: Any, shape: tuple[int, ...], fill: float = 0) -> np.memmap:
    """A new .npy file (must not exist), reserved on disk, filled with `fill`: a map of its array."""
    header = _npy_header(dtype, shape)
    nbytes = len(header) + int(np.prod(shape)) * np.dtype(dtype).itemsize
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        reserve(fd, nbytes, path)
        os.pwrite(fd, header, 0)
    except BaseException:
        os.close(fd)
        raise
    mm = _map(fd, dtype, shape, True, offset=len(header))
    if fill != 0:
        mm[:] = fill
        mm.flush()
    return mm


def open_npy(path: Path, dtype: Any, shape: tuple[int, ...], writable: bool) -> np.memmap:
    """Map an existing .npy file whose header must say `dtype` and `shape` (C order) and whose size
    must match the header exactly."""
    if not os.path.lexists(path):
        raise damaged(path, "is missing")
    fd = _open_fd(path, writable)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                got_shape, fortran, got_dtype = read(f)
            except (ValueError, OSError, SyntaxError) as exc:
                raise damaged(path, f"is not a valid .npy file ({exc})") from None
            offset = f.tell()
        if got_dtype != np.dtype(dtype) or tuple(got_shape) != tuple(shape) or fortran:
            raise damaged(path, f"holds a {got_dtype} array of shape {tuple(got_shape)}, expected "
                                f"{np.dtype(dtype).name} {tuple(shape)}")
        size, nbytes = os.fstat(fd).st_size, offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
        if size != nbytes:
            raise damaged(path, f"has {size} bytes, expected {nbytes} (a {np.dtype(dtype).name} array of shape "
                                f"{tuple(shape)}): truncated or extended")
        if writable:
            reserve(fd, nbytes, path)
    except BaseException:
        os.close(fd)
        raise
    return _map(fd, dtype, shape, writable, offset=offset)


class WriterLock:
    """An advisory lock on <store>/.lock held while featurizing: exclusive for one writer, shared by
    the ranks of one distributed run. A second writer fails at once with a clear message; readers
    take no lock. The lock goes with the process (a killed writer leaves none behind)."""

    def __init__(self, folder: Path, shared: bool = False):
        self.fd = None
        path = folder / LOCK
        if os.path.lexists(path):
            check_regular(path)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except PermissionError:
            raise TracInError(f"cannot write to {folder} (read-only): featurizing into a store needs write "
                              "access; a complete store can be queried read-only (GradientIndex.load).") from None
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise TracInError(f"another writer ({holder}) is featurizing into {folder}; wait for it to finish "
                              "(then run again: finished rows are kept), or pass another store folder.") from None
        if not shared:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()}".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()


def replaceable(path: Path) -> bool:
    """Whether save() may write at `path`: False if it is new or an empty folder, True if it is a
    store (metadata.json of a store, no other files); anything else is a TracInError."""
    if not os.path.lexists(path):
        return False
    if path.is_symlink() or not path.is_dir():
        raise TracInError(f"{path} exists and is not a folder; save() writes only to a new or empty folder "
                          "or over an index saved before. Pass another path.")
    names = [e.name for e in os.scandir(path)]
    if not names:
        return False
    others = [n for n in names if not is_store_file(n)]
    if others or METADATA not in names:
        raise TracInError(f"{path} is not empty and is not a saved index (it holds {sorted(others or names)[:5]}); "
                          "save() never overwrites your files. Pass a new or empty folder.")
    read_metadata(path)  # a store's metadata (damaged: TracInError)
    lock = WriterLock(path)  # nobody is featurizing into it
    lock.release()
    return True


def remove_store(path: Path) -> None:
    """Delete a store folder written by this package: its store files by name, then the empty folder
    (anything else in it stays, and so does the folder)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return
    for entry in os.scandir(path):
        if is_store_file(entry.name) and not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.path)
    try:
        os.rmdir(path)
    except OSError:
        pass
