"""Checkpoints: file formats, recorder round trip, ordering, learning rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tracin_engine as te


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_recorder_round_trip_reads_lr_step_and_momentum(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    rec = te.CheckpointRecorder(tmp_path, every=10)
    for step in range(1, 31):
        path = rec.save(model, opt, step)
        assert (path is not None) == (step % 10 == 0)
        if step % 10 == 0:
            sched.step()
    ckpts = te.Checkpoints.from_dir(tmp_path)
    assert [c.step for c in ckpts] == [10, 20, 30]
    assert ckpts.learning_rates.tolist() == [0.5, 0.25, 0.125]
    assert ckpts[0].extra["momentum"] == 0.9
    state = ckpts.load(2)
    assert set(state) == set(model.state_dict())
    assert not list(tmp_path.glob("*.tmp"))


def test_from_files_formats(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"model_state_dict": model.state_dict(), "lr": 0.3}, tmp_path / "nested.pt")
    a = te.Checkpoints.from_files([tmp_path / "bare.pt"], learning_rates=[0.1])
    b = te.Checkpoints.from_files([tmp_path / "nested.pt"])
    assert b.learning_rates.tolist() == [0.3]
    for key, value in model.state_dict().items():
        assert torch.equal(a.load(0)[key], value) and torch.equal(b.load(0)[key], value)


def test_from_dir_orders_numerically(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = te.CheckpointRecorder(tmp_path)
    for step in (100, 9, 1000):
        rec.save(model, opt, step)
    assert [c.step for c in te.Checkpoints.from_dir(tmp_path)] == [9, 100, 1000]


def test_in_memory_state_dicts_are_copies():
    model = _model()
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()], [0.2])
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(ckpts.load(0)["0.weight"], model[0].weight)


def test_index_does_not_modify_the_model(cnn_run, small_digits):
    model, ckpts = cnn_run
    before = {k: v.clone() for k, v in model.state_dict().items()}
    te.TracIn(model, ckpts, loss_fn=torch.nn.functional.cross_entropy, layers="last").index(
        small_digits.train, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fingerprint_is_a_content_digest_of_the_tensors(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    torch.save({"model_state_dict": model.state_dict(), "lr": 0.3, "optimizer": "SGD"}, tmp_path / "nested.pt")
    changed = {k: v.clone() for k, v in model.state_dict().items()}
    changed["2.bias"][1] += 1e-6
    torch.save(changed, tmp_path / "changed.pt")
    ckpts = te.Checkpoints.from_files([tmp_path / n for n in ("bare.pt", "nested.pt", "changed.pt")],
                                      learning_rates=[0.1, 0.1, 0.1])
    with pytest.warns(UserWarning, match="identical weights"):
        fp = ckpts.fingerprint()
    assert [e["name"] for e in fp] == ["bare.pt", "nested.pt", "changed.pt"]
    assert fp[0]["digest"] == fp[1]["digest"] != fp[2]["digest"]  # same tensors, other file layouts
    memory = te.Checkpoints.from_state_dicts([model.state_dict()], [0.1])
    assert memory.fingerprint()[0]["digest"] == fp[0]["digest"]


def test_digest_is_computed_once_while_loading(tmp_path, monkeypatch):
    import tracin_engine.checkpoints as checkpoints

    model = _model()
    torch.save(model.state_dict(), tmp_path / "c.pt")
    calls = []
    inner = checkpoints.state_digest
    monkeypatch.setattr(checkpoints, "state_digest", lambda state: calls.append(1) or inner(state))
    ckpts = te.Checkpoints(te.Checkpoints.from_files([tmp_path / "c.pt"], learning_rates=[0.1]), cache_bytes=0)
    ckpts.load(0)
    ckpts.load(0)
    ckpts.fingerprint()
    assert len(calls) == 1


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf"), "0.1", True])
def test_learning_rates_must_be_finite_positive_numbers(tmp_path, lr):
    model = _model()
    torch.save({"state_dict": model.state_dict(), "learning_rate": lr}, tmp_path / "c.pt")
    torch.save({"state_dict": model.state_dict(), "learning_rate": 0.1}, tmp_path / "ok.pt")
    match = r"learning rate of checkpoint 1 \(c.pt\) is .*(not a number|finite and positive)"
    with pytest.raises(te.TracInError, match=match):
        te.Checkpoints.from_files([tmp_path / "ok.pt", tmp_path / "c.pt"])  # stored in the file
    with pytest.raises(te.TracInError, match=match):
        te.Checkpoints.from_files([tmp_path / "ok.pt", tmp_path / "c.pt"], learning_rates=[0.1, lr])
    with pytest.raises(te.TracInError, match="learning rate of checkpoint 0"):
        te.Checkpoints.from_state_dicts([model.state_dict()], [lr])


def test_numpy_and_tensor_learning_rates_are_accepted(tmp_path):
    import numpy as np

    model = _model()
    ckpts = te.Checkpoints.from_state_dicts([model.state_dict()] * 2, [np.float32(0.5), torch.tensor(0.25)])
    assert ckpts.learning_rates.tolist() == [0.5, 0.25]


def test_duplicate_checkpoints_warn(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    torch.save(model.state_dict(), tmp_path / "b.pt")
    with pytest.warns(UserWarning, match="listed more than once"):
        te.Checkpoints.from_files([tmp_path / "a.pt", tmp_path / "a.pt"], learning_rates=[0.1, 0.1])
    ckpts = te.Checkpoints.from_files([tmp_path / "a.pt", tmp_path / "b.pt"], learning_rates=[0.1, 0.1])
    with pytest.warns(UserWarning, match=r"checkpoints \[0, 1\] hold identical weights"):
        ckpts.fingerprint()
