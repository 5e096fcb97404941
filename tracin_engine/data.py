"""Adapt what users pass as data into batches of (inputs, targets) with known example indices.

Accepted: a tuple/list of tensors `(X, y)` or `(X,)`, a `Dataset` of `(x, y)` items (or bare `x`),
a `DataLoader` (must not shuffle), or anything iterable together with `batch_fn(batch) -> (x, y)`.
Targets may be None (unlabeled data, for target="prediction").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from .errors import TracInError

BatchFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]]


def _as_tensor(v: Any, what: str) -> torch.Tensor:
    if torch.is_tensor(v):
        return v
    if isinstance(v, np.ndarray):
        return torch.from_numpy(v)
    try:
        return torch.as_tensor(v)
    except Exception as exc:  # noqa: BLE001
        raise TracInError(f"could not turn {what} of type {type(v).__name__} into a tensor; "
                          "pass batch_fn=... mapping a batch to (inputs, targets) tensors.") from exc


def _split_item(item: Any, batch_fn: BatchFn | None) -> tuple[Any, Any]:
    if batch_fn is not None:
        return batch_fn(item)
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return item[0], item[1]
        if len(item) == 1:
            return item[0], None
        raise TracInError(f"a data item has {len(item)} parts; expected (x, y) or x. "
                          "Pass batch_fn=... mapping a batch to (inputs, targets).")
    if isinstance(item, dict):
        raise TracInError("data items are dicts; pass batch_fn=lambda b: (b['input'], b['label']) "
                          "naming your keys.")
    return item, None


@dataclass
class DataSource:
    """Uniform view: `len(source)` examples, `batches(batch_size, skip)` yields (start, x, y)."""

    data: Any
    batch_fn: BatchFn | None = None

    def __post_init__(self):
        d = self.data
        if isinstance(d, DataSource):
            self.data, self.batch_fn = d.data, d.batch_fn
            d = self.data
        if isinstance(d, DataLoader):
            if isinstance(d.sampler, RandomSampler):
                raise TracInError("the DataLoader shuffles, so scores could not be matched to examples; "
                                  "build it with shuffle=False.")
            self._n = len(d.dataset)
        elif isinstance(d, (tuple, list)) and d and all(torch.is_tensor(t) or isinstance(t, np.ndarray) for t in d):
            tensors = [_as_tensor(t, "data") for t in d]
            if len(tensors) > 2:
                raise TracInError(f"got a tuple of {len(tensors)} tensors; pass (X, y) or (X,).")
            n = tensors[0].shape[0]
            if any(t.shape[0] != n for t in tensors):
                raise TracInError(f"inputs and targets have different lengths "
                                  f"({[t.shape[0] for t in tensors]}); they must match.")
            self.data = tuple(tensors)
            self._n = n
        elif hasattr(d, "__len__") and hasattr(d, "__getitem__"):
            self._n = len(d)
        else:
            raise TracInError(f"cannot read data of type {type(d).__name__}; pass (X, y) tensors, a Dataset, "
                              "a DataLoader, or batch_fn=... to adapt your batches.")
        if self._n == 0:
            raise TracInError("the data is empty (0 examples); pass at least one example.")

    def __len__(self) -> int:
        return self._n

    @property
    def is_loader(self) -> bool:
        return isinstance(self.data, DataLoader)

    def _slice(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        d = self.data
        if isinstance(d, tuple):
            if self.batch_fn is not None:
                return self.batch_fn(tuple(t[start:stop] for t in d))
            return d[0][start:stop], (d[1][start:stop] if len(d) > 1 else None)
        items = [_split_item(d[i], self.batch_fn) for i in range(start, stop)]
        xs = torch.stack([_as_tensor(x, "an input") for x, _ in items])
        ys = [y for _, y in items]
        if all(y is None for y in ys):
            return xs, None
        if any(y is None for y in ys):
            raise TracInError(f"some items in examples {start}..{stop - 1} have labels and some do not.")
        return xs, torch.stack([_as_tensor(y, "a label") for y in ys])

    def batches(self, batch_size: int, skip: Callable[[int, int], bool] | None = None
                ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Yield (start, inputs (B, ...), targets (B, ...) or None) in example order.

        skip(start, stop) -> True skips a batch (already featurized) without computing on it.
        A DataLoader keeps its own batch size.
        """
        if self.is_loader:
            start = 0
            for batch in self.data:
                x, y = _split_item(batch, self.batch_fn)
                x = _as_tensor(x, "inputs")
                stop = start + x.shape[0]
                if not (skip and skip(start, stop)):
                    yield start, x, (None if y is None else _as_tensor(y, "targets"))
                start = stop
            return
        for start in range(0, self._n, batch_size):
            stop = min(start + batch_size, self._n)
            if skip and skip(start, stop):
                continue
            x, y = self._slice(start, stop)
            yield start, _as_tensor(x, "inputs"), (None if y is None else _as_tensor(y, "targets"))

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One example (x, y) without a batch dimension, for display."""
        if self.is_loader:
            x, y = _split_item(self.data.dataset[i], self.batch_fn)
            return _as_tensor(x, "input"), (None if y is None else _as_tensor(y, "label"))
        x, y = self._slice(i, i + 1)
        return x[0], (None if y is None else y[0])

    def subset(self, indices) -> "DataSource":
        """The examples at `indices`, as tensors (X, y) or (X,)."""
        idx = [int(i) for i in indices]
        pairs = [self.example(i) for i in idx]
        xs = torch.stack([x for x, _ in pairs])
        if pairs[0][1] is None:
            return DataSource((xs,))
        return DataSource((xs, torch.stack([y for _, y in pairs])))

    def labels(self) -> torch.Tensor | None:
        """All targets (n,) when the data has them, else None."""
        ys = [y for _, _, y in self.batches(1024)]
        if not ys or ys[0] is None:
            return None
        return torch.cat([y.reshape(len(y), *y.shape[1:]) for y in ys])


def as_source(data: Any, batch_fn: BatchFn | None = None) -> DataSource:
    """Wrap user data (see module docstring) into a DataSource."""
    return data if isinstance(data, DataSource) and batch_fn is None else DataSource(data, batch_fn)
