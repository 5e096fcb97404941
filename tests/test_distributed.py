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
            def rows(self, state, x, yy, target="loss"):  # what featurize() calls for every micro-batch
                seen.append(int(x.shape[0]))
                return inner(self, state, x, yy, target)

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
    for c in range(len(ckpts)):
        assert torch.allclose(shared.features(c), single.features(c), rtol=1e-5, atol=1e-7)
    assert torch.allclose(shared.sq_norms, single.store.sq_norms, rtol=1e-5)
    assert torch.allclose(shared.out_sq_norms, single.store.out_sq_norms, rtol=1e-5)
    assert torch.allclose(shared.losses, single.store.losses, rtol=1e-5)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # each rank featurized only its shard (rows 0..39 and 40..69, per checkpoint) and sees the whole index
    assert [r["rows"] for r in reports] == [40 * len(ckpts), 30 * len(ckpts)]
    for r in reports:
        assert r["n_train"] == 70 and r["complete"]
        si = torch.tensor(r["self_influence"], dtype=torch.float64)
        assert torch.allclose(si, single.self_influence(), rtol=1e-5)
