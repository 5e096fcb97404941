"""The one out-of-memory policy of the engine: sizes from free memory, halving on failure, errors kept.

Example:
    >>> rows = rows_that_fit(bytes_per_row=4 * dim, device=dev, maximum=65536)  # a block that fits now
    >>> size = Backoff(rows, dev, what="scoring block")
    >>> size.run(lambda b: score(start, start + b))    # on OOM: free the cache, halve b, run again

Rules (docs/gpu.md):
1. Sizes come from the memory free on the computing device when the work starts: CUDA
   free_bytes = torch.cuda.mem_get_info() free + what PyTorch's caching allocator holds unused;
   CPU: resources.available_memory() (MemAvailable within a container's limit). One working set takes at most FRACTION of it.
2. Every loop that allocates in proportion to a size (featurization micro-batches, vmap chunks,
   scoring blocks, SOURCE batches, clustering blocks, the test-feature buffer) runs under a
   Backoff: an out-of-memory error frees the allocator cache, halves the size for good and runs
   the same step again (steps are pure, so nothing is counted twice).
3. Out-of-memory errors are recognized by type (torch.OutOfMemoryError) and by the allocator
   failures that arrive as plain RuntimeError (cuBLAS / cuDNN / cuFFT / cuSOLVER ALLOC_FAILED, the
   CPU allocator's "can't allocate memory"); is_oom() says which. They are never wrapped into another
   error type: when the size cannot shrink further the ORIGINAL exception is re-raised, with a note
   saying what ran out and what to change.
"""

from __future__ import annotations

import gc
from typing import Callable, TypeVar

import torch

from .resources import available_memory

T = TypeVar("T")

FRACTION = 0.5  # of the free memory, for one working set
ALLOCATOR_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                      "CUFFT_ALLOC_FAILED", "CUSOLVER_STATUS_ALLOC_FAILED", "CUSPARSE_STATUS_ALLOC_FAILED",
                      "can't allocate memory", "Failed to allocate")
CPU_FALLBACK_BYTES = 4 * 2**30  # where /proc/meminfo and sysconf are both unavailable


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` (or the exception it was raised from) reports an allocation failure."""
    while exc is not None:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in ALLOCATOR_MESSAGES):
            return True
        exc = exc.__cause__
    return False


def _cpu_available() -> int:
    """resources.available_memory() (MemAvailable, within a container's limit), or a fallback."""
    avail = available_memory()
    return CPU_FALLBACK_BYTES if avail is None else max(0, avail)


def free_bytes(device: str | torch.device) -> int:
    """Bytes that can be allocated on `device` now (see the module docstring; meta: unbounded)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    if device.type == "meta":
        return 2**50
    return _cpu_available()


def budget(device: str | torch.device, fraction: float = FRACTION, cap: int | None = None) -> int:
    """fraction * free_bytes(device), at most `cap` bytes."""
    b = int(fraction * free_bytes(device))
    return b if cap is None else min(b, int(cap))


def rows_that_fit(bytes_per_row: int, device: str | torch.device, minimum: int = 1, maximum: int | None = None,
                  fraction: float = FRACTION, cap_bytes: int | None = None) -> int:
    """How many rows of `bytes_per_row` fit in budget(device, fraction, cap_bytes), clamped to
    [minimum, maximum]."""
    rows = budget(device, fraction, cap_bytes) // max(1, int(bytes_per_row))
    if maximum is not None:
        rows = min(rows, int(maximum))
    return max(int(minimum), int(rows))


def fits(nbytes: int, device: str | torch.device, fraction: float = FRACTION) -> bool:
    """Whether `nbytes` fit in fraction * free_bytes(device)."""
    return int(nbytes) <= budget(device, fraction)


def release(device: str | torch.device) -> None:
    """Drop unreachable tensors and hand PyTorch's cached CUDA blocks back (after an OOM)."""
    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def add_advice(exc: BaseException, advice: str) -> None:
    """Attach `advice` to the exception's message (a note, Python >= 3.11), keeping its type."""
    if hasattr(exc, "add_note"):
        exc.add_note(advice)


class Backoff:
    """A size (rows of a batch or a block) that halves for good after each out-of-memory error.

    run(step) calls step(size) until it returns; on an OOM (is_oom) it frees memory, halves the size
    (not below `minimum`) and calls again. At the minimum the original exception is re-raised with
    a note naming `what` and `advice`. `retries` counts the halvings.
    """

    def __init__(self, size: int, device: str | torch.device, what: str = "batch", advice: str = "",
                 minimum: int = 1):
        self.size, self.minimum = max(int(minimum), int(size)), int(minimum)
        self.device, self.what, self.advice = torch.device(device), what, advice
        self.retries = 0

    def run(self, step: Callable[[int], T]) -> T:
        while True:
            try:
                return step(self.size)
            except Exception as exc:  # noqa: BLE001 - only allocation failures are handled
                if not is_oom(exc):
                    raise
                if self.size <= self.minimum:
                    advice = self.advice or "free memory on the device or use a smaller model."
                    add_advice(exc, f"tracin: out of memory on {self.device} with a {self.what} of {self.size} "
                                    f"(the smallest); {advice}")
                    raise
            self.size = max(self.minimum, self.size // 2)  # outside `except`: the failed step's tensors are freed
            self.retries += 1
            release(self.device)
