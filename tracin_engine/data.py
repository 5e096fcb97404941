"""Adapt what users pass as data into batches of (inputs, targets) with known example indices.

Inputs may be a tensor, a tuple of tensors (a multi-input model, called as model(*x)) or a dict of
tensors (called as model(**x), e.g. a tokenizer's output); see inputs.py. Accepted data:
  * tensors: (X, y) or (X,); (X1, X2, ..., y) for a multi-input model (the last is the target);
    (inputs, y) or (inputs,) with inputs a tuple or dict of tensors;
  * a dict of tensors (a tokenizer's output for the whole set): labels under 'labels' (or 'label');
  * a Dataset of (x, y) items, bare x, (x1, x2, ..., y) or dicts (a datasets.Dataset; labels under
    'labels' or 'label'; text columns are left out);
  * a DataLoader (must not shuffle) whose batches have one of the forms above;
  * anything else with batch_fn(batch) -> (inputs, targets).
Targets may be None (unlabeled data, for target="prediction").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from . import inputs as tree
from .errors import TracInError

BatchFn = Callable[[Any], tuple[Any, torch.Tensor | None]]
LABEL_KEYS = ("labels", "label")


def split_labels(d: Mapping) -> tuple[dict, Any]:
    """A dict batch or item -> (the other entries, its 'labels' (or 'label') entry or None)."""
    d = dict(d)
    for key in LABEL_KEYS:
        if key in d:
            return d, d.pop(key)
    return d, None


def _split_item(item: Any, batch_fn: BatchFn | None) -> tuple[Any, Any]:
    if batch_fn is not None:
        out = batch_fn(item)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TracInError(f"batch_fn returned a {type(out).__name__}; it must return a pair (inputs, targets) "
                              "with inputs a tensor, a tuple or a dict of tensors and targets a tensor or None.")
        return out[0], out[1]
    if isinstance(item, Mapping):
        return split_labels(item)
    if isinstance(item, (tuple, list)):
        if len(item) == 1:
            return item[0], None
        if len(item) == 2:
            return item[0], item[1]
        return tuple(item[:-1]), item[-1]  # (x1, x2, ..., y): a multi-input model
    return item, None


def _untranspose(v: Any) -> Any:
    """A dict value that PyTorch's default collate turned from per-example lists (length T) into a list
    of T tensors (B,) -> one tensor (B, T)."""
    if isinstance(v, (list, tuple)) and v and all(torch.is_tensor(t) and t.dim() == 1 for t in v) \
            and len({t.shape for t in v}) == 1:
        return torch.stack(list(v), 1)
    return v


def _fix(batch_fn: BatchFn | None) -> str:
    if batch_fn is not None:
        return ("your batch_fn must return (inputs, targets) with inputs a tensor, a tuple or a dict of tensors, "
                "targets a tensor or None.")
    return ("pass tensors, tuples or dicts of tensors, or batch_fn=... mapping a batch to (inputs, targets).")


def _columns(d: Any) -> tuple[Any, Any] | None:
    """Whole-data tensors -> (inputs, targets or None), or None when d is not of that form."""
    if isinstance(d, Mapping) and tree.is_inputs(d):
        return split_labels(d)
    if not isinstance(d, (tuple, list)) or not d or not tree.is_inputs(d):
        return None
    if all(torch.is_tensor(t) or isinstance(t, np.ndarray) for t in d):
        return _split_item(tuple(d), None)
    if len(d) <= 2:  # (inputs, y) or (inputs,) with inputs a tuple or dict of tensors
        x, y = d[0], (d[1] if len(d) == 2 else None)
        if isinstance(x, Mapping) and y is None:
            return split_labels(x)
        return x, y
    return None


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
        elif (cols := _columns(d)) is not None:
            self._raw = tree.as_tensors(dict(d) if isinstance(d, Mapping) else tuple(d), "the data", _fix(None))
            x, y = _columns(self._raw)
            n = tree.length(x)
            if y is not None and (not torch.is_tensor(y) or y.dim() == 0 or y.shape[0] != n):
                raise TracInError(f"inputs and targets have different lengths ({n} inputs, targets "
                                  f"{tree.describe(y)}); they must match.")
            self.columns = (x, y)
            self._n = n
        elif isinstance(d, Mapping):
            raise TracInError(f"a dict as data must map names to tensors with one row per example (what a "
                              f"tokenizer returns with return_tensors='pt'); got {tree.describe(d)}.")
        elif hasattr(d, "__len__") and hasattr(d, "__getitem__"):
            self._n = len(d)
        else:
            hint = ("batch_fn maps the items or batches of such data, so wrap it in one (a DataLoader without "
                    "shuffling, or a Dataset)." if self.batch_fn is not None else
                    "pass (X, y) tensors, a dict of tensors, a Dataset, a DataLoader, or batch_fn=... to adapt "
                    "the items of a Dataset or the batches of a DataLoader.")
            raise TracInError(f"cannot read data of type {type(d).__name__} (it has no length and no "
                              f"indexing); {hint}")
        if self._n == 0:
            raise TracInError("the data is empty (0 examples); pass at least one example.")

    def __len__(self) -> int:
        return self._n

    @property
    def is_loader(self) -> bool:
        return isinstance(self.data, DataLoader)

    columns = None  # (inputs, targets or None) when the data are whole-set tensors

    def _convert(self, x: Any, y: Any) -> tuple[Any, torch.Tensor | None]:
        fix = _fix(self.batch_fn)
        return tree.as_tensors(x, "the inputs", fix), (None if y is None else tree.as_tensors(y, "the targets", fix))

    def _slice(self, start: int, stop: int) -> tuple[Any, torch.Tensor | None]:
        if self.columns is not None:
            x, y = self.columns
            if self.batch_fn is not None:
                return self._convert(*_split_item(tree.take(self._raw, start, stop), self.batch_fn))
            return tree.take(x, start, stop), (None if y is None else y[start:stop])
        d = self.data
        items = [self._convert(*_split_item(d[i], self.batch_fn)) for i in range(start, stop)]
        xs = tree.stack([x for x, _ in items])
        ys = [y for _, y in items]
        if all(y is None for y in ys):
            return xs, None
        if any(y is None for y in ys):
            raise TracInError(f"some items in examples {start}..{stop - 1} have labels and some do not.")
        return xs, tree.stack(ys)

    def batches(self, batch_size: int, skip: Callable[[int, int], bool] | None = None
                ) -> Iterator[tuple[int, Any, torch.Tensor | None]]:
        """Yield (start, inputs (B, ...) (a tensor, tuple or dict), targets (B, ...) or None) in order.

        skip(start, stop) -> True skips a batch (already featurized) without computing on it.
        A DataLoader keeps its own batch size.
        """
        if self.is_loader:
            start = 0
            for batch in self.data:
                if isinstance(batch, Mapping) and self.batch_fn is None:
                    batch = {k: _untranspose(v) for k, v in batch.items()}
                x, y = self._convert(*_split_item(batch, self.batch_fn))
                stop = start + tree.length(x)
                if not (skip and skip(start, stop)):
                    yield start, x, y
                start = stop
            return
        for start in range(0, self._n, batch_size):
            stop = min(start + batch_size, self._n)
            if skip and skip(start, stop):
                continue
            x, y = self._slice(start, stop)
            yield start, x, y

    def example(self, i: int) -> tuple[Any, torch.Tensor | None]:
        """One example (x, y) without a batch dimension, for display (x a tensor, tuple or dict)."""
        if self.is_loader:
            return self._convert(*_split_item(self.data.dataset[i], self.batch_fn))
        x, y = self._slice(i, i + 1)
        return tree.item(x, 0), (None if y is None else y[0])

    def subset(self, indices) -> "DataSource":
        """The examples at `indices`, as tensors ((inputs, y) or (inputs,))."""
        idx = [int(i) for i in indices]
        pairs = [self.example(i) for i in idx]
        xs = tree.stack([x for x, _ in pairs])
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
