"""Small data sets and models for tutorials, tests and benchmarks (data ships inside scikit-learn).

Example:
    >>> data = load_digits_split(seed=0)                  # Split of tensors, images (N, 1, 8, 8) in [0, 1]
    >>> model = DigitsCNN()
    >>> paths = train(model, data.train, "runs/digits", epochs=8, n_checkpoints=4)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import CheckpointRecorder


@dataclass
class Split:
    """train / test tuples of tensors (X, y), plus class names."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    class_names: list[str]


def load_digits_split(n_test: int = 297, seed: int = 0, dtype: torch.dtype = torch.float32) -> Split:
    """sklearn's 1797 handwritten 8x8 digits: X (N, 1, 8, 8) scaled to [0, 1], y (N,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.images, dtype=dtype).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:n_test], perm[n_test:]
    return Split((X[tr], y[tr]), (X[te], y[te]), [str(i) for i in range(10)])


class DigitsCNN(nn.Module):
    """conv(1->8, 3x3) -> ReLU -> conv(8->16, 3x3) -> ReLU -> flatten -> fc(576->32) -> ReLU -> fc(32->10)."""

    def __init__(self, width: int = 8, hidden: int = 32, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3)
        self.fc1 = nn.Linear(2 * width * 36, hidden)
        self.fc2 = nn.Linear(hidden, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding: (B, hidden)."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.embed(x))


class MLP(nn.Module):
    """in -> hidden -> ReLU -> hidden -> ReLU -> out, inputs flattened."""

    def __init__(self, n_in: int, n_out: int, hidden: int = 32):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(n_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, n_out)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.embed(x))


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], run_dir: str | Path, epochs: int = 8,
          n_checkpoints: int = 4, lr: float = 0.1, batch_size: int = 32, loss_fn=F.cross_entropy,
          momentum: float = 0.0, seed: int = 0, lr_decay: float = 1.0) -> list[Path]:
    """Plain SGD; saves `n_checkpoints` evenly spaced checkpoints with CheckpointRecorder.

    lr_decay multiplies the learning rate after every epoch (so checkpoints carry different lrs).
    """
    X, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=lr_decay)
    steps_per_epoch = (len(X) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    save_at = {round(total * (i + 1) / n_checkpoints) for i in range(n_checkpoints)}
    recorder = CheckpointRecorder(run_dir)
    step = 0
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for s in range(0, len(X), batch_size):
            idx = perm[s:s + batch_size]
            opt.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if step in save_at:
                recorder.save(model, opt, step, batch_size=batch_size)
        sched.step()
    model.eval()
    return recorder.paths
