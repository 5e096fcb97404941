"""Featurized rows into a FeatureStore, with the finiteness check; on CUDA without waiting for the GPU.

Example (what gradients/featurize.py does):
    >>> writer = RowWriter(store, torch.device("cuda"))
    >>> writer.put(c, start, rows, sq_norms, "checkpoint 0")   # returns at once on CUDA
    >>> writer.flush()                                        # every row put so far is in the store

Immediate (the CPU, or rows larger than PIPELINE_MAX_BYTES): put() checks and writes at once.
Pipelined (CUDA): put() starts non-blocking copies of the rows (B, dim), their squared norms, output
norms and losses (B,) into pinned host memory, records an event and returns; the rows put before it
are then checked and written once their event has completed. The copy and the write of micro-batch k
thus overlap the GPU's work on micro-batch k + 1.

The finiteness check reads the squared norms (B,) the caller computed from the rows (their layout's
sq_norms): a NaN or inf entry makes its row's norm non-finite (every column is in a segment's sum, and
each entry meets itself: NaN * NaN, inf * inf), so only rows with a non-finite norm are read again, entry
by entry (a norm can also overflow). No extra pass over the rows, no synchronizing `nonzero` per batch.

Nothing computed is lost: flush() (featurize calls it at the end of every checkpoint and on any error)
writes every pending micro-batch in order; a non-finite row raises TracInError naming its example
indices after every earlier row is written (featurize.check_finite's message).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ..errors import TracInError
from .feature_store import FeatureStore

PIPELINE_MAX_BYTES = 2**28  # larger micro-batches (exact rows of big models) are written at once


def non_finite_rows(feats: torch.Tensor, sums: torch.Tensor) -> list[int]:
    """Rows of feats (B, dim) holding NaN or inf, given their sums or squared norms (B,): rows whose sum
    is finite are finite (NaN and inf propagate); the others are checked entry by entry (a sum can
    overflow)."""
    suspect = (~torch.isfinite(sums)).nonzero().flatten()
    if not len(suspect):
        return []
    return suspect[~torch.isfinite(feats[suspect]).all(1)].tolist()


def raise_non_finite(bad: list[int], start: int, checkpoint_name: str) -> None:
    idx = [start + i for i in bad]
    raise TracInError(
        f"non-finite gradients (NaN or inf) at {checkpoint_name} for example indices {idx[:20]}"
        f"{' ...' if len(idx) > 20 else ''}. Check those inputs and labels, or whether the "
        "checkpoint's weights are finite; rows computed so far are kept.")


def row_sums(feats: torch.Tensor) -> torch.Tensor:
    """(B,) sums of the rows, in float32 at least."""
    return feats.sum(1) if feats.dtype in (torch.float32, torch.float64) else feats.float().sum(1)


@dataclass
class _Pending:
    c: int
    start: int
    name: str
    feats: torch.Tensor
    sq_norms: torch.Tensor
    out_sq_norms: torch.Tensor | None
    losses: torch.Tensor | None
    event: "torch.cuda.Event | None"


class RowWriter:
    """Writes featurized micro-batches into `store`; pipelined when `device` is CUDA (or `pipelined=True`,
    which tests use to run the same bookkeeping on the CPU, where copies are plain and synchronous)."""

    def __init__(self, store: FeatureStore, device: torch.device, pipelined: bool | None = None,
                 depth: int = 1):
        self.store, self.device = store, torch.device(device)
        self.pipelined = self.device.type == "cuda" if pipelined is None else pipelined
        self.depth = depth              # micro-batches left in flight after a put
        self._queue: deque[_Pending] = deque()

    def put(self, c: int, start: int, feats: torch.Tensor, sq_norms: torch.Tensor,
            checkpoint_name: str, out_sq_norms: torch.Tensor | None = None,
            losses: torch.Tensor | None = None) -> None:
        """Rows start..start+B of checkpoint c: feats (B, dim), sq_norms (B,) float64 (the layout's
        squared norms of these rows: also the finiteness screen), out_sq_norms and losses (B,) or None;
        on the rows' device."""
        if not self.pipelined or feats.numel() * feats.element_size() > PIPELINE_MAX_BYTES:
            self.flush()                # keep the order of writes
            bad = non_finite_rows(feats, sq_norms)
            if bad:
                raise_non_finite(bad, start, checkpoint_name)
            self.store.write(c, start, feats, sq_norms, out_sq_norms=out_sq_norms, losses=losses)
            return
        cuda = feats.device.type == "cuda"

        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
            return out.copy_(t.detach(), non_blocking=cuda)

        pending = _Pending(c, start, checkpoint_name, host(feats), host(sq_norms), host(out_sq_norms),
                           host(losses), None)
        if cuda:
            pending.event = torch.cuda.Event()
            pending.event.record()
        self._queue.append(pending)
        while len(self._queue) > self.depth:
            self._complete(self._queue.popleft())

    def flush(self) -> None:
        """Check and write every pending micro-batch, in order."""
        while self._queue:
            self._complete(self._queue.popleft())

    def discard(self) -> None:
        """Forget pending micro-batches (after an error that makes them unreadable)."""
        self._queue.clear()

    def _complete(self, p: _Pending) -> None:
        if p.event is not None:
            p.event.synchronize()
        bad = non_finite_rows(p.feats, p.sq_norms)
        if bad:
            self._queue.clear()         # rows after a bad one are not written: the user fixes the data first
            raise_non_finite(bad, p.start, p.name)
        self.store.write(p.c, p.start, p.feats, p.sq_norms, out_sq_norms=p.out_sq_norms, losses=p.losses)
