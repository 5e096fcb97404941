"""The stored features as the scoring device sees them: used in place, made resident once, or streamed.

Example:
    >>> feats = DeviceFeatures(store, torch.device("cuda"))   # mode "resident" when the store fits
    >>> f = feats.block(c, start, stop)                       # (b, dim) on the device, stored dtype
    >>> feats.sq_norms(c, start, stop)                        # (b,) float64 on the device

Modes (chosen once, when the object is made; a GradientIndex keeps one per device):
    "direct":   the features already live on the device (a CPU store scored on the CPU, or a store
                made with FeatureStore.resident(device)): blocks are views, nothing is copied.
    "resident": the whole store fits in RESIDENT_FRACTION of the device's free memory
                (memory.free_bytes): every checkpoint's features are copied to the device ONCE, in
                the stored dtype (float16 stays float16: half the bytes), and upcast there, block
                by block, by the scorer. Queries then move no feature across PCIe.
    "stream":   otherwise: rows are copied block by block into one of two pinned (page-locked)
                host buffers and sent with non-blocking copies, so the copy of the next block
                overlaps the products of the current one; a buffer is refilled only after the
                event recorded behind its last copy has completed.
The squared norms (C, n) float64 (8 bytes per example and checkpoint) are always kept on the device.
If making the store resident runs out of memory, the object falls back to streaming (memory.py).
"""

from __future__ import annotations

import torch

from ..memory import fits, is_oom, release
from .feature_store import FeatureStore

RESIDENT_FRACTION = 0.5
MODES = ("auto", "direct", "resident", "stream")


def store_bytes(store: FeatureStore) -> int:
    """Bytes of all stored features (C x n x dim x itemsize)."""
    return store.n_checkpoints * store.n * store.dim * torch.empty((), dtype=store.dtype).element_size()


class DeviceFeatures:
    """Blocks of a FeatureStore on `device` (see the module docstring). n, n_checkpoints, dim, dtype
    mirror the store's."""

    def __init__(self, store: FeatureStore, device: str | torch.device, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.store, self.device = store, torch.device(device)
        self.n, self.n_checkpoints, self.dim, self.dtype = store.n, store.n_checkpoints, store.dim, store.dtype
        if mode == "auto":
            here = all(store.features(c).device == self.device for c in range(store.n_checkpoints))
            mode = "direct" if here or self.device.type == "cpu" else (
                "resident" if fits(store_bytes(store), self.device, RESIDENT_FRACTION) else "stream")
        self._features: list[torch.Tensor] | None = None
        if mode == "resident":
            try:
                self._features = [store.features(c).to(self.device) for c in range(store.n_checkpoints)]
            except Exception as exc:  # noqa: BLE001 - only allocation failures fall back
                if not is_oom(exc):
                    raise
                mode = "stream"
        if self._features is None and mode == "stream":
            release(self.device)
        self.mode = mode
        self._sq_norms = store.sq_norms.to(self.device)
        self._staging: list[torch.Tensor | None] = [None, None]
        self._events: list = [None, None]
        self._slot = 0
        self.copied_bytes = 0  # bytes sent to the device by block() (stream mode)

    def __repr__(self) -> str:
        return f"DeviceFeatures(mode={self.mode!r}, device='{self.device}', n={self.n}, dtype={self.dtype})"

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def block(self, c: int, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of checkpoint c: Tensor (b, dim) on the device, in the stored dtype."""
        if self.mode == "direct":
            return self.store.features(c)[start:stop]
        if self.mode == "resident":
            return self._features[c][start:stop]
        return self._streamed(c, start, stop)

    def sq_norms(self, c: int, start: int, stop: int) -> torch.Tensor:
        """||g_c(z)||^2 of rows start..stop-1: Tensor (b,) float64 on the device."""
        return self._sq_norms[c, start:stop]

    def _streamed(self, c: int, start: int, stop: int) -> torch.Tensor:
        b, slot = stop - start, self._slot
        self._slot ^= 1
        cuda = self.device.type == "cuda"
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy that last read this buffer is done
        buf = self._staging[slot]
        if buf is None or buf.shape[0] < b:
            buf = torch.empty(b, self.dim, dtype=self.dtype, pin_memory=cuda)
            self._staging[slot] = buf
        buf[:b].copy_(self.store.features(c)[start:stop])
        self.copied_bytes += b * self.dim * self.itemsize
        if not cuda:  # (forced streaming off CUDA, for tests) the caller gets its own copy
            return buf[:b].to(self.device, copy=True)
        out = buf[:b].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[slot] = event
        return out
