"""A user's files are never deleted; a store answers only for what built it; damaged stores are
refused, never repaired by guessing; a full disk is an OSError, never a signal; an index too large
for memory is refused before anything is allocated. (Small MLP, 40 examples, 3 checkpoint files.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracin_engine as te
from tracin_engine.store import files


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _write_run(folder: Path, model: nn.Module, seed: int = 0) -> te.Checkpoints:
    """3 checkpoint files (weights drifting from the model's), lrs 0.1, 0.05, 0.02."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i, lr in enumerate((0.1, 0.05, 0.02)):
        state = {k: v + 0.1 * i * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
        paths.append(folder / f"checkpoint-{i:08d}.pt")
        torch.save({"state_dict": state, "learning_rate": lr, "step": i}, paths[-1])
    return te.Checkpoints.from_files(paths)


@pytest.fixture()
def run(tmp_path):
    """(model, checkpoints, (X, y)) with 40 examples of 6 features, 3 classes."""
    model = _model()
    ckpts = _write_run(tmp_path / "run", model)
    g = torch.Generator().manual_seed(1)
    return model, ckpts, (torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))


def _tracin(run, ckpts=None):
    model, c, _ = run
    return te.TracIn(model, ckpts or c, loss_fn=F.cross_entropy, device="cpu")


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- save() ----------------------------------------------------------------------------------------
def test_save_never_deletes_user_files(run, tmp_path):
    index = _tracin(run).index(run[2], progress=False)
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "paper.pdf").write_bytes(b"%PDF-1.4 my thesis")
    (papers / "data.csv").write_text("a,b\n1,2\n")
    before, run_before = _snapshot(papers), _snapshot(tmp_path / "run")
    with pytest.raises(te.TracInError, match="not empty and is not a saved index.*never overwrites"):
        index.save(papers)
    with pytest.raises(te.TracInError, match="not a saved index"):
        index.save(tmp_path / "run")  # the checkpoint folder
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(te.TracInError, match="is not a folder"):
        index.save(tmp_path / "notes.txt")
    assert _snapshot(papers) == before and _snapshot(tmp_path / "run") == run_before
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "papers", "run"]  # no temporary left


def test_save_to_new_empty_or_own_folder_and_replace(run, tmp_path):
    X, y = run[2]
    a = _tracin(run).index((X, y), progress=False)
    b = _tracin(run).index((X.flip(0), y.flip(0)), progress=False)
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "new" / "ix", tmp_path / "empty"):
        a.save(where)
        assert torch.equal(te.GradientIndex.load(where, _tracin(run)).self_influence(), a.self_influence())
    b.save(tmp_path / "empty")  # over an index saved before: replaced
    again = te.GradientIndex.load(tmp_path / "empty", _tracin(run), train_data=(X.flip(0), y.flip(0)))
    assert torch.equal(again.self_influence(), b.self_influence())
    with pytest.raises(te.TracInError, match="training data: stored 40 examples"):
        te.GradientIndex.load(tmp_path / "empty", _tracin(run), train_data=(X, y))
    (tmp_path / "empty" / "mine.txt").write_text("x")  # a store with a user file inside is not ours to replace
    with pytest.raises(te.TracInError, match="mine.txt"):
        a.save(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new", "run"]


def test_save_is_atomic(run, tmp_path, monkeypatch):
    a = _tracin(run).index(run[2], progress=False)
    a.save(tmp_path / "ix")
    before = _snapshot(tmp_path / "ix")

    def fail(self, path, metadata):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(te.FeatureStore, "copy_to", fail)
    with pytest.raises(OSError, match="injected"):
        a.save(tmp_path / "ix")
    assert _snapshot(tmp_path / "ix") == before  # the saved index is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "run"]


# -- identity ---------------------------------------------------------------------------------------
def test_other_data_is_refused_and_never_mixed(run, tmp_path):
    X, y = run[2]
    store = tmp_path / "ix"
    full = _tracin(run).index((X, y), store=store, progress=False, batch_size=8)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    for other in ((X[perm], y[perm]), (X + 1, y), (X, (y + 1) % 3)):  # shuffled, other inputs, other labels
        with pytest.raises(te.TracInError, match="training data: stored 40 examples .* now 40 examples"):
            _tracin(run).index(other, store=store, progress=False)
    # a half-built store: resuming with other data is refused before anything is written
    part = tmp_path / "part"
    t = _tracin(run)
    fs = te.FeatureStore.open_or_create(part, 40, 3, t.dim, torch.float32, {**t.metadata(),
                                        "data": te.fingerprint.data_fingerprint(te.data.as_source((X, y)))})
    fs.write(0, 0, full.features(0)[:16])
    fs.finish_writing()
    done_before = te.FeatureStore.load(part).done_mask.clone()
    with pytest.raises(te.TracInError, match="training data"):
        _tracin(run).index((X[perm], y[perm]), store=part, progress=False)
    assert torch.equal(te.FeatureStore.load(part).done_mask, done_before)
    resumed = _tracin(run).index((X, y), store=part, progress=False, batch_size=8)
    for c in range(3):
        assert torch.equal(resumed.features(c), full.features(c))


def test_checkpoints_with_the_same_names_and_sizes_but_other_weights_are_refused(run, tmp_path):
    store = tmp_path / "ix"
    _tracin(run).index(run[2], store=store, progress=False)
    other = _write_run(tmp_path / "other_run", run[0], seed=5)  # same names, lrs, steps and file sizes
    assert [c.name for c in other] == [c.name for c in run[1]]
    assert [os.path.getsize(c.source) for c in other] == [os.path.getsize(c.source) for c in run[1]]
    with pytest.raises(te.TracInError, match=r"checkpoint 1 \(checkpoint-00000001.pt\): digest: stored .*other weights"):
        _tracin(run, other).index(run[2], store=store, progress=False)
    with pytest.raises(te.TracInError, match="other weights"):
        te.GradientIndex.load(store, _tracin(run, other))


def test_a_second_writer_fails_fast_and_readers_need_no_lock(run, tmp_path):
    store = tmp_path / "ix"
    X, y = run[2]
    t = _tracin(run)
    fs = te.FeatureStore.open_or_create(store, 40, 3, t.dim, torch.float32,
                                        {**t.metadata(), "data": te.fingerprint.data_fingerprint(te.data.as_source((X, y)))})
    # fs (a writer) holds the lock: another writer, even of the same data, fails at once
    with pytest.raises(te.TracInError, match=r"another writer \(pid \d+\) is featurizing into"):
        _tracin(run).index((X, y), store=store, progress=False)
    assert te.FeatureStore.load(store).n == 40  # a reader opens it meanwhile
    fs.finish_writing()
    index = _tracin(run).index((X, y), store=store, progress=False)
    assert index.store.complete and not index.store.writable


# -- validation on open -------------------------------------------------------------------------------
def _built(run, folder: Path) -> te.GradientIndex:
    return _tracin(run).index(run[2], store=folder, progress=False)


@pytest.mark.parametrize("damage, message", [
    ("truncate features", r"features_001.bin has 640 bytes, expected 4320 \(float32 array of shape \(40, 27\)\)"),
    ("truncate norms", r"sq_norms.npy has .* bytes, expected .*truncated"),
    ("done shape", r"done.npy holds a uint8 array of shape \(3, 10\), expected uint8 \(3, 40\)"),
    ("edit n", r"features_000.bin has 4320 bytes, expected 432000000|n: stored 4000000, now 40"),
    ("bad json", r"metadata.json is not valid JSON"),
    ("bad dim", r"metadata.json has dim='7', not a positive integer"),
])
def test_damaged_stores_are_refused_and_left_as_they_are(run, tmp_path, damage, message):
    store = tmp_path / "ix"
    index = _built(run, store)
    expected = index.self_influence()
    del index
    meta = json.loads((store / "metadata.json").read_text())
    if damage == "truncate features":
        os.truncate(store / "features_001.bin", 640)  # rows of 27 values: (6 + 1) + 8 and (8 + 1) + 3 factors
    elif damage == "truncate norms":
        os.truncate(store / "sq_norms.npy", 200)
    elif damage == "done shape":
        np.save(store / "done.npy", np.ones((3, 10), dtype=np.uint8))
    elif damage == "edit n":
        (store / "metadata.json").write_text(json.dumps({**meta, "n": 4_000_000}))
    elif damage == "bad json":
        (store / "metadata.json").write_text(json.dumps(meta)[:-20])
    elif damage == "bad dim":
        (store / "metadata.json").write_text(json.dumps({**meta, "dim": "7"}))
    before = {p.name: p.stat().st_size for p in store.iterdir()}
    for attempt in (lambda: te.GradientIndex.load(store, _tracin(run)),
                    lambda: _tracin(run).index(run[2], store=store, progress=False)):
        with pytest.raises(te.TracInError, match=message):
            attempt()
    assert {p.name: p.stat().st_size for p in store.iterdir()} == before  # nothing extended or rewritten
    assert expected.shape == (40,)


def test_symlinks_inside_a_store_are_refused(run, tmp_path):
    store = tmp_path / "ix"
    index = _built(run, store)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(index.features(0).numpy().tobytes())
    before = victim.read_bytes()
    (store / "features_000.bin").unlink()
    (store / "features_000.bin").symlink_to(victim)
    for attempt in (lambda: te.GradientIndex.load(store, _tracin(run)),
                    lambda: _tracin(run).index(run[2], store=store, progress=False)):
        with pytest.raises(te.TracInError, match="features_000.bin is a symbolic link"):
            attempt()
    (store / "features_000.bin").unlink()
    (store / "features_000.bin").write_bytes(before)
    (store / "done.npy").rename(tmp_path / "done.npy")
    (store / "done.npy").symlink_to(tmp_path / "done.npy")  # a writer would mark rows of another file
    with pytest.raises(te.TracInError, match="done.npy is a symbolic link"):
        te.FeatureStore.open(store, writable=True)
    assert victim.read_bytes() == before


def test_a_read_only_store_can_be_queried_and_is_never_written(run, tmp_path):
    store = tmp_path / "ix"
    expected = _built(run, store).influence(run[2])
    snapshot = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in store.iterdir()}
    for p in store.iterdir():
        p.chmod(0o444)
    store.chmod(0o555)
    try:
        index = te.GradientIndex.load(store, _tracin(run))
        assert torch.equal(index.influence(run[2]), expected)
        again = _tracin(run).index(run[2], store=store, progress=False)  # complete: opened read-only
        assert torch.equal(again.influence(run[2]), expected)
        with pytest.raises(te.TracInError, match="open read-only"):
            index.store.write(0, 0, torch.zeros(1, index.store.dim))
    finally:
        store.chmod(0o755)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in store.iterdir()} == snapshot


# -- resources ------------------------------------------------------------------------------------
class Huge(torch.utils.data.Dataset):
    """10^12 examples produced on demand; counts how many were read."""

    def __init__(self):
        self.reads = 0

    def __len__(self):
        return 10**12

    def __getitem__(self, i):
        self.reads += 1
        return torch.ones(6), torch.tensor(i % 3)


def test_an_index_too_large_is_refused_before_any_allocation(run, tmp_path):
    data = Huge()
    with pytest.raises(te.TracInError, match=r"in-memory index of 1000000000000 examples x 3 checkpoints x 27 "
                                             r"values x 4 bytes .* needs .* TB, but only .* of memory is available"
                                             r".*proj_dim=.*store=.*layers="):
        _tracin(run).index(data, progress=False)
    assert data.reads <= 2  # only the examples that settle the per-example path
    with pytest.raises(te.TracInError, match=r"a store of 1000000000000 examples .* needs .* on disk"):
        _tracin(run).index(data, store=tmp_path / "ix", progress=False)
    assert not (tmp_path / "ix").exists() and data.reads <= 4


DISK_FULL = textwrap.dedent("""
    import json, resource, sys
    import torch, torch.nn.functional as F
    import tracin_engine as te
    sys.path.insert(0, sys.argv[1])
    from test_reliability_store import _model, _write_run
    from pathlib import Path
    tmp = Path(sys.argv[2])
    model = _model()
    ckpts = _write_run(tmp / "run", model)
    X, y = torch.randn(300, 6, generator=torch.Generator().manual_seed(1)), torch.arange(300) % 3
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy, device="cpu")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))  # files of at most 16 KB: a "full disk"
    out = {}
    try:
        tracin.index((X, y), store=tmp / "ix", progress=False)
        out["error"] = None
    except OSError as exc:
        out["error"], out["type"] = str(exc), type(exc).__name__
    out["left"] = sorted(p.name for p in (tmp / "ix").iterdir()) if (tmp / "ix").exists() else None
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again: run again
    index = tracin.index((X, y), store=tmp / "ix", progress=False)
    ref = tracin.index((X, y), progress=False)
    out["equal"] = all(torch.equal(index.features(c), ref.features(c)) for c in range(3))
    print(json.dumps(out))
""")


def test_a_full_disk_is_an_oserror_with_path_and_size_and_the_store_resumes(tmp_path):
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(te.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]  # no SIGBUS / SIGXFSZ: the process lives on
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # features_000.bin: 300 x 27 float32 = 32,400 bytes > 16 KB
    assert out["type"] == "OSError", out
    assert "could not reserve 32400 bytes on disk for " in out["error"] and "features_000.bin" in out["error"]
    assert out["left"] is None  # the half-created store was removed (its folder was new)
    assert out["equal"]


def test_reserving_falls_back_to_zeros_and_reports_no_space(tmp_path, monkeypatch):
    import errno

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    mm = files.create_raw(tmp_path / "a.bin", np.float32, (1000, 300))
    st = os.stat(tmp_path / "a.bin")
    assert st.st_size == 1_200_000 and st.st_blocks * 512 >= st.st_size  # written, not sparse
    assert not mm.any()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"could not reserve 1200000 bytes on disk for .*b.bin: No space left"):
        files.create_raw(tmp_path / "b.bin", np.float32, (1000, 300))


def test_a_store_from_before_fingerprints_opens_with_a_warning(run, tmp_path):
    store = tmp_path / "ix"
    expected = _built(run, store).self_influence()
    meta = json.loads((store / "metadata.json").read_text())
    del meta["data"]
    for entry in meta["checkpoints"]:
        entry["size"] = 1234
        del entry["digest"]
    (store / "metadata.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="before content fingerprints.*checkpoint 0.*cannot be verified"):
        index = te.GradientIndex.load(store, _tracin(run))
    assert torch.equal(index.self_influence(), expected)
    with pytest.warns(UserWarning, match="checkpoint 0, checkpoint 1, checkpoint 2, the training data cannot"):
        again = _tracin(run).index(run[2], store=store, progress=False)
    assert torch.equal(again.self_influence(), expected)
    meta["learning_rates"][1] = 0.5  # what can be compared still is
    (store / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(te.TracInError, match=r"learning_rates: stored \[0.1, 0.5, 0.02\], now \[0.1, 0.05, 0.02\]"):
        te.GradientIndex.load(store, _tracin(run))
