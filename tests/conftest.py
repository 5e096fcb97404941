"""Shared fixtures: sklearn digits, a small CNN and an MLP trained with CheckpointRecorder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tracin_engine as te
from tracin_engine.examples import MLP, DigitsCNN, load_digits_split, train


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; this machine has no GPU (run on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: a folder named gpu is a keyword too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits():
    """Split: train (1500, 1, 8, 8), test (297, ...), float32."""
    return load_digits_split(seed=0)


@pytest.fixture(scope="session")
def small_digits(digits):
    """300 train / 40 test examples: fast enough for the exact and Captum comparisons."""
    (X, y), (Xt, yt) = digits.train, digits.test
    return te.examples.Split((X[:300], y[:300]), (Xt[:40], yt[:40]), digits.class_names)


@pytest.fixture(scope="session")
def cnn_run(small_digits, tmp_path_factory):
    """(model, Checkpoints) for DigitsCNN trained 6 epochs with a decaying lr, 4 checkpoints."""
    torch.manual_seed(0)
    model = DigitsCNN(width=4, hidden=16)
    run = tmp_path_factory.mktemp("cnn_run")
    train(model, small_digits.train, run, epochs=6, n_checkpoints=4, lr=0.1, lr_decay=0.8)
    return model, te.Checkpoints.from_dir(run)


@pytest.fixture(scope="session")
def mlp_run(small_digits, tmp_path_factory):
    """(model, Checkpoints) for an MLP on flattened digits, 3 checkpoints."""
    torch.manual_seed(1)
    model = MLP(64, 10, hidden=24)
    run = tmp_path_factory.mktemp("mlp_run")
    train(model, small_digits.train, run, epochs=5, n_checkpoints=3, lr=0.2, lr_decay=0.7)
    return model, te.Checkpoints.from_dir(run)


@pytest.fixture(scope="session")
def cnn_index(cnn_run, small_digits):
    model, ckpts = cnn_run
    tracin = te.TracIn(model, ckpts, loss_fn=F.cross_entropy)
    return tracin.index(small_digits.train, progress=False)
