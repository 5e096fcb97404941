"""Memory and disk checks made before anything large is allocated or written.

Example:
    >>> need = 300 * 3 * 4096 * 2                        # n x checkpoints x row length x bytes
    >>> check_memory(need, "an in-memory index of ...")  # TracInError when it cannot fit
    >>> check_disk(need, "runs/index", "a store of ...")

available_memory(): MemAvailable of /proc/meminfo, lowered to the cgroup v2 (container) limit minus
its working set (usage less inactive page cache) where one is set; None where neither can be read
(then nothing is refused).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import TracInError

FIXES = ("pass proj_dim= (e.g. proj_dim=4096: rows of 4096 values), store='a/new/folder' (features "
         "memory-mapped on disk, not in memory), or layers=[...] (fewer parameters per row)")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping: int, or None when unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None and hasattr(os, "sysconf"):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            avail = None
    limit, used = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None:
        used -= _inactive_file()  # page cache the kernel reclaims before refusing an allocation
        avail = limit - used if avail is None else min(avail, limit - used)
    return avail


def _inactive_file() -> int:
    try:
        with open("/sys/fs/cgroup/memory.stat") as f:
            for line in f:
                if line.startswith("inactive_file "):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def free_disk(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_memory(nbytes: int, what: str) -> None:
    """Raise TracInError (size, availability, fixes) if `nbytes` exceed the available memory."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise TracInError(f"{what} needs {format_bytes(nbytes)}, but only {format_bytes(avail)} of memory "
                          f"is available. Nothing was allocated. To fit: {FIXES}.")


def check_disk(nbytes: int, path: str | os.PathLike, what: str) -> None:
    """Raise TracInError if `nbytes` exceed the free space of the filesystem holding `path`."""
    free = free_disk(path)
    if nbytes > free:
        raise TracInError(f"{what} needs {format_bytes(nbytes)} on disk at {path}, but only {format_bytes(free)} "
                          f"is free. Nothing was written. Free some space, choose a folder on another disk, "
                          f"or make rows smaller: proj_dim=, layers=[...], dtype=torch.float16.")
