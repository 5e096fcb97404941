"""Featurization sharded over the ranks of torch.distributed (torchrun), into one on-disk index.

Example (every rank runs the same script, e.g. `torchrun --nproc_per_node 8 featurize.py`):
    >>> torch.distributed.init_process_group("nccl")           # or "gloo" on CPUs
    >>> tracin = TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=4096, projection="factored",
    ...                 device=local_device())                 # cuda:LOCAL_RANK, and torch.cuda.set_device
    >>> index = index_distributed(tracin, train_data, store="/shared/index")   # GradientIndex on every rank

Devices and waiting (NCCL): local_device() reads LOCAL_RANK (set by torchrun) and calls
torch.cuda.set_device, so rank r of a node computes on its own GPU, not all on cuda:0;
index_distributed refuses a TracIn on another GPU than LOCAL_RANK's. The ranks wait for each other
on a separate gloo group (CPU, no GPU to guess, no NCCL watchdog) with `timeout` (default
DEFAULT_TIMEOUT, 24 h): the final barrier waits for the slowest shard, and in a resumed run the
ranks whose rows are already done reach it at once, so the wait can be as long as a whole
featurization pass. The batch size (hence the shards) is the smallest any rank picks.

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

import datetime
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..data import BatchFn, as_source
from ..devices import resolve_device
from ..errors import TracInError
from ..gradients.featurize import auto_batch_size
from .index import GradientIndex



def shard_rows(n: int, rank: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """Rows (lo, hi) of `rank`: contiguous, disjoint, covering 0..n-1, cut at batch boundaries."""
    if not 0 <= rank < world_size:
        raise TracInError(f"rank {rank} is outside 0..{world_size - 1}.")
    per = math.ceil(math.ceil(n / batch_size) / world_size) * batch_size
    return min(n, rank * per), min(n, (rank + 1) * per)


DEFAULT_TIMEOUT = datetime.timedelta(hours=24)


def local_device() -> torch.device:
    """This process's device under torchrun: cuda:LOCAL_RANK (made the current CUDA device with
    torch.cuda.set_device) when CUDA is present, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not 0 <= local < torch.cuda.device_count():
        raise TracInError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPUs; "
                          "launch with torchrun --nproc_per_node <= the GPU count.")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def check_rank_device(device: torch.device, backend: str, local_rank: int | None) -> None:
    """Under NCCL the TracIn must compute on cuda:LOCAL_RANK (else every rank would share one GPU,
    or NCCL would guess a device); raises a TracInError naming the fix."""
    if str(backend).lower() != "nccl":
        return
    want = torch.device("cuda", local_rank if local_rank is not None else 0)
    if device != want:
        raise TracInError(f"this rank (LOCAL_RANK={local_rank}) computes on {device}, but NCCL ranks must each use "
                          f"their own GPU ({want}); build the TracIn with device=local_device() "
                          "(tracin_engine.methods.distributed).")


def agreed_batch_size(requested: int, group: Any) -> int:
    """The smallest batch size any rank asks for (all_reduce MIN over `group`), so every rank cuts the
    same shards even when free memory differs between GPUs."""
    import torch.distributed as dist

    t = torch.tensor([int(requested)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t[0])


def index_distributed(tracin: Any, train_data: Any, store: str | Path, batch_size: int | None = None,
                      progress: bool = True, batch_fn: BatchFn | None = None,
                      dtype: torch.dtype | None = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT
                      ) -> GradientIndex:
    """Featurize this rank's shard of `train_data` into the shared `store`; return the whole index.

    Call it on every rank of an initialized process group, with the same arguments. Only rank 0
    shows a progress bar. Returns the same GradientIndex (n_train rows) on every rank. The ranks
    wait for each other on a gloo group with `timeout` (see the module docstring).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise TracInError("index_distributed needs torch.distributed.init_process_group(...) first "
                          "(torchrun sets the environment); for one process use tracin.index(data, store=path).")
    if store is None:
        raise TracInError("index_distributed needs store=<folder shared by all ranks>.")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = os.environ.get("LOCAL_RANK")
    check_rank_device(resolve_device(tracin.device), dist.get_backend(), None if local is None else int(local))
    waits = dist.new_group(backend="gloo", timeout=timeout)  # barriers on the CPU, with a long timeout
    source = as_source(train_data, batch_fn)
    bs = batch_size or auto_batch_size(tracin.featurizer)
    if source.is_loader:
        bs = source.data.batch_size or bs
    bs = agreed_batch_size(bs, waits)
    lo, hi = shard_rows(len(source), rank, world, bs)
    if rank == 0:  # create (or validate, when resuming) the folder before anyone opens it
        tracin.featurize_rows(source, store, rows=(0, 0), batch_size=bs, progress=False, dtype=dtype)
    dist.barrier(group=waits)
    tracin.featurize_rows(source, store, rows=(lo, hi), batch_size=bs, progress=progress and rank == 0,
                          dtype=dtype)
    dist.barrier(group=waits)
    dist.destroy_process_group(waits)
    return GradientIndex.load(store, tracin)
