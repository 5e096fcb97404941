"""Checkpoints: file formats, recorder round trip, ordering, learning rates."""

from __future__ import annotations

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
