"""Content fingerprints: what a store was built from, so that reopening it with anything else is an error.

Example:
    >>> state_digest(model.state_dict())                  # 'a3f2...' (32 hex digits)
    >>> data_fingerprint(source)                           # {'n': 300, 'digest': '...', 'example_shape': [64], ...}

state_digest: blake2b-128 over the tensors of a state dict in sorted key order, each as
name, dtype, shape and raw bytes (so equal tensors give equal digests whatever the file format).
data_fingerprint: a streaming blake2b-128 over the examples and labels exactly as they are
featurized (each batch's dtype, shape and bytes, inputs and labels in separate streams), plus n.
Batches come from DataSource.batches(HASH_BATCH) (a DataLoader keeps its own batches), so the
digest does not depend on the featurization batch size. Random data pipelines (augmentation)
give a different digest on every pass: a store can only be resumed or reopened with the same data.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch

from . import inputs as tree

HASH_BATCH = 512


def _update(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def tensor_digest(t: torch.Tensor) -> str:
    """32 hex digits identifying a tensor's dtype, shape and values."""
    h = hashlib.blake2b(digest_size=16)
    _update(h, t)
    return h.hexdigest()


def state_digest(state: Mapping[str, object]) -> str:
    """32 hex digits identifying the tensors of a state dict (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(state):
        value = state[key]
        if torch.is_tensor(value):
            h.update(key.encode() + b"\0")
            _update(h, value)
    return h.hexdigest()


class DataHasher:
    """Streaming fingerprint of (inputs, labels) batches: update(x, y) per batch, then result()."""

    def __init__(self):
        self.x, self.y = hashlib.blake2b(digest_size=16), hashlib.blake2b(digest_size=16)
        self.n = 0
        self.example_shape: list[int] | None = None
        self.example_dtype: str | None = None

    def update(self, x: Any, y: torch.Tensor | None) -> None:
        """x: a tensor, or a tuple / dict of tensors (inputs.py); dict keys are hashed with their tensors."""
        if torch.is_tensor(x):
            _update(self.x, x)
        else:
            if isinstance(x, Mapping):
                self.x.update(("dict:" + ",".join(map(str, x))).encode())
            for t in tree.leaves(x):
                _update(self.x, t)
        if y is None:
            self.y.update(b"none")
        else:
            _update(self.y, y)
        if self.n == 0 and torch.is_tensor(x):  # the shape check of test examples covers plain tensors
            self.example_shape, self.example_dtype = list(x.shape[1:]), str(x.dtype).replace("torch.", "")
        self.n += tree.length(x)

    def result(self) -> dict:
        """{'n', 'digest', 'example_shape', 'example_dtype'}: JSON-able, stored in a store's metadata."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.n}".encode() + self.x.digest() + self.y.digest())
        return {"n": self.n, "digest": h.hexdigest(), "example_shape": self.example_shape,
                "example_dtype": self.example_dtype}


def data_fingerprint(source) -> dict:
    """Fingerprint of every example and label of a DataSource (one pass over the data): see DataHasher."""
    hasher = DataHasher()
    for _, x, y in source.batches(HASH_BATCH):
        hasher.update(x, y)
    return hasher.result()
