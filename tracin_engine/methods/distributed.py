"""Featurization sharded over the ranks of torch.distributed (torchrun), into one on-disk index.

Example (every rank runs the same script, e.g. `torchrun --nproc_per_node 8 featurize.py`):
    >>> torch.distributed.init_process_group("nccl")           # or "gloo" on CPUs
    >>> tracin = TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=4096, projection="factored",
    ...                 device=f"cuda:{local_rank}")
    >>> index = index_distributed(tracin, train_data, store="/shared/index")   # GradientIndex on every rank

Layout: the ranks share ONE store folder (see store.py). Rank 0 creates it (metadata.json, the
memory-mapped features_<c>.bin, sq_norms.npy, out_sq_norms.npy, losses.npy, done.npy) and every
rank then writes the disjoint rows [lo, hi) of its shard into the same files; rows are flushed
before their done flags, so an interrupted job is resumed by launching it again (each rank skips
its rows already done, whatever the previous world size). After a barrier every rank reopens the
folder as one complete index.
Shard r holds examples [r * s, (r + 1) * s) with s a multiple of batch_size, s ~ n / world_size.
Across several nodes the folder must be on a filesystem all nodes mount with coherent writes to
disjoint byte ranges (Lustre, GPFS, BeeGFS, a local disk for one node); the data must list the
examples in the same order on every rank (no shuffling, no DistributedSampler).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..data import BatchFn, as_source
from ..errors import TracInError
from ..gradients.featurize import auto_batch_size
from .index import GradientIndex



def shard_rows(n: int, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """Rows (lo, hi) of `rank`: contiguous, disjoint, covering 0..n-1, cut at batch boundaries."""
    if not 0 <= rank < world_size:
        raise TracInError(f"rank {rank} is outside 0..{world_size - 1}.")
    per = math.ceil(math.ceil(n / batch_size) / world_size) * batch_size
    return min(n, rank * per), min(n, (rank + 1) * per)


def index_distributed(tracin: Any, train_data: Any, store: str | Path, batch_size: int | None = None,
                      progress: bool = True, batch_fn: BatchFn | None = None,
                      dtype: torch.dtype | None = None) -> GradientIndex:
    """Featurize this rank's shard of `train_data` into the shared `store`; return the whole index.

    Call it on every rank of an initialized process group, with the same arguments. Only rank 0
    shows a progress bar. Returns the same GradientIndex (n_train rows) on every rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise TracInError("index_distributed needs torch.distributed.init_process_group(...) first "
                          "(torchrun sets the environment); for one process use tracin.index(data, store=path).")
    if store is None:
        raise TracInError("index_distributed needs store=<folder shared by all ranks>.")
    rank, world = dist.get_rank(), dist.get_world_size()
    source = as_source(train_data, batch_fn)
    bs = batch_size or auto_batch_size(tracin.featurizer)
    if source.is_loader:
        bs = source.data.batch_size or bs
    lo, hi = shard_rows(len(source), rank, world, bs)
    if rank == 0:  # create (or validate, when resuming) the folder before anyone opens it
        tracin.featurize_rows(source, store, rows=(0, 0), batch_size=bs, progress=False, dtype=dtype)
    dist.barrier()
    tracin.featurize_rows(source, store, rows=(lo, hi), batch_size=bs, progress=progress and rank == 0,
                          dtype=dtype)
    dist.barrier()
    return GradientIndex.load(store, tracin)
