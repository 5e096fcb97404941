"""Featurization sharded over 2 CPU processes (gloo on 127.0.0.1) equals single-process featurization."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.methods.distributed import index_distributed, shard_rows


def float32_tolerance(model: torch.nn.Module, proj_dim: int) -> float:
    """Relative error allowed between two float32 featurizations that sum in different orders
    (thread counts, vector widths): u * sum of the reduction lengths K along the path, the first-order
    worst-case rounding bound gamma_K = K u of each summation (Higham), added over the forward pass,
    the backward pass, the per-layer gradient sums and the projection. Linear: in + out features;
    Conv2d: (in + out) * kernel area + output positions (at most the input's, 8 x 8 here);
    projection: proj_dim. u = 2^-24."""
    total = proj_dim
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.in_features + m.out_features
        elif isinstance(m, torch.nn.Conv2d):
            area = m.kernel_size[0] * m.kernel_size[1]
            total += (m.in_channels + m.out_channels) * area + 64
    return total * torch.finfo(torch.float32).eps / 2


def rows_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Norm-wise, row by row: ||a_i - b_i|| <= tol ||b_i|| (entries of a row near zero may differ
    more in relative terms, by cancellation; the row as a whole may not)."""
    a, b = a.double(), b.double()
    return bool(((a - b).norm(dim=-1) <= tol * b.norm(dim=-1)).all())


def test_shards_are_disjoint_batch_aligned_and_cover_everything():
    for n, world, bs in [(100, 2, 10), (101, 3, 8), (5, 4, 2), (1, 2, 256)]:
        spans = [shard_rows(n, r, world, bs) for r in range(world)]
        covered = [i for lo, hi in spans for i in range(lo, hi)]
        assert covered == list(range(n))
        assert all(lo % bs == 0 for lo, hi in spans if hi > lo)
    with pytest.raises(te.TracInError, match="rank"):
        shard_rows(10, 2, 2, 5)


def test_needs_a_process_group(cnn_run, small_digits, tmp_path):
    model, ckpts = cnn_run
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    with pytest.raises(te.TracInError, match="init_process_group"):
        index_distributed(tracin, small_digits.train, store=tmp_path / "ix")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str, data_file: str, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        X, y = torch.load(data_file)
        tracin = te.TracIn(te.examples.DigitsCNN(width=4, hidden=16), te.Checkpoints.from_dir(run_dir),
                           loss_fn=F.cross_entropy, proj_dim=128, projection="factored", device="cpu")
        seen = []
        inner = tracin.featurizer.__class__.rows

        class Spy(tracin.featurizer.__class__):
            def rows(self, state, x, yy, target="loss", rows_out=None):  # what featurize() calls per micro-batch
                seen.append(int(x.shape[0]))
                return inner(self, state, x, yy, target, rows_out=rows_out)

        tracin.featurizer.__class__ = Spy
        index = index_distributed(tracin, (X, y), store=store, batch_size=10, progress=False, dtype=torch.float32)
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "rows": sum(seen), "n_train": index.n_train, "complete": index.store.complete,
            "self_influence": index.self_influence().tolist()}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(cnn_run, small_digits, tmp_path):
    import torch.multiprocessing as mp

    model, ckpts = cnn_run
    X, y = small_digits.train[0][:70], small_digits.train[1][:70]
    data_file = tmp_path / "data.pt"
    torch.save((X, y), data_file)
    run_dir = str(Path(ckpts[0].source).parent)
    store = tmp_path / "ix"
    ctx = mp.spawn(_worker, args=(2, _free_port(), run_dir, str(data_file), str(store), str(tmp_path)),
                   nprocs=2, join=False)
    for _ in range(120):  # bounded: at most 120 s
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("the 2-process featurization did not finish within 120 s")

    single = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, proj_dim=128, projection="factored",
                       device="cpu").index((X, y), progress=False, batch_size=10, dtype=torch.float32)
    shared = te.FeatureStore.load(store)
    assert shared.complete
    # The ranks ran on 1 thread, the reference on however many this process has: float32 sums in
    # another order. Tolerance: the first-order rounding bound of every summation on the path.
    tol = float32_tolerance(model, proj_dim=128)
    for c in range(len(ckpts)):
        assert rows_close(shared.features(c), single.features(c), tol)
    # squared norms, output norms: sums of squares (no cancellation), so elementwise
    for a, b in ((shared.sq_norms, single.store.sq_norms), (shared.out_sq_norms, single.store.out_sq_norms)):
        assert torch.allclose(a, b, rtol=2 * tol, atol=0)
    assert rows_close(shared.losses, single.store.losses, tol)  # per checkpoint, norm-wise
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # each rank featurized only its shard (rows 0..39 and 40..69, per checkpoint) and sees the whole index;
    # rank 0, which creates the store, also calibrated the factored shares on the first 16 examples at
    # every checkpoint (4 here); rank 1 took that allocation from the store instead of calibrating again
    assert [r["rows"] for r in reports] == [(40 + 16) * len(ckpts), 30 * len(ckpts)]
    assert single.store.metadata["projection_allocation"] == json.loads(
        (store / "metadata.json").read_text())["projection_allocation"]
    for r in reports:
        assert r["n_train"] == 70 and r["complete"]
        si = torch.tensor(r["self_influence"], dtype=torch.float64)
        assert torch.allclose(si, single.self_influence(), rtol=2 * tol, atol=0)  # sums of squares
    # the check has teeth: rows of another example, or one float16 rounding, are far outside it
    f = single.features(0)
    assert not rows_close(f.roll(1, 0), f, tol) and not rows_close(f.half().float(), f, tol)
