"""Model inputs of one batch: a tensor, a tuple of tensors, or a dict of tensors.

Example:
    >>> x = {"input_ids": ids, "attention_mask": mask}     # each (B, T): what a tokenizer returns
    >>> length(x)                                          # B
    >>> take(x, 0, 2)                                      # the first two examples, same structure
    >>> item(x, 3)                                         # example 3 without the batch dimension
    >>> stack([item(x, 0), item(x, 1)])                    # back to a batch of 2

A model is called as model(x) for a tensor, model(*x) for a tuple (multi-input models) and
model(**x) for a dict (keyword arguments); see gradients/calls.py. Every tensor of a batch holds
the examples along dimension 0. These helpers are the only code that looks inside a batch's
structure, so the rest of the engine works the same for all three forms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Union

import numpy as np
import torch

from .errors import TracInError

Inputs = Union[torch.Tensor, tuple, dict]


def map_inputs(fn: Callable[[torch.Tensor], torch.Tensor], x: Any) -> Any:
    """Apply fn to every tensor of x, keeping the structure (tensor, tuple/list -> tuple, dict)."""
    if torch.is_tensor(x):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: map_inputs(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(map_inputs(fn, v) for v in x)
    raise TracInError(f"a batch holds a {type(x).__name__}; inputs must be tensors, tuples or dicts of tensors.")


def leaves(x: Any) -> list[torch.Tensor]:
    """The tensors of x in order."""
    out: list[torch.Tensor] = []
    map_inputs(lambda t: out.append(t) or t, x)
    return out


def length(x: Any) -> int:
    """Number of examples B of a batch (dimension 0 of its tensors, which must agree)."""
    ts = leaves(x)
    if not ts:
        raise TracInError("a batch holds no tensors; nothing to pass to the model.")
    if any(t.dim() == 0 for t in ts):
        raise TracInError(f"a batch holds a 0-dimensional tensor ({describe(x)}); every input needs a "
                          "batch dimension first.")
    n = ts[0].shape[0]
    if any(t.shape[0] != n for t in ts):
        raise TracInError(f"the inputs of one batch have different numbers of examples: {describe(x)}; "
                          "every tensor must hold the examples along dimension 0.")
    return n


def take(x: Any, start: int, stop: int) -> Any:
    """Examples start..stop-1 of a batch, same structure."""
    return map_inputs(lambda t: t[start:stop], x)


def item(x: Any, i: int) -> Any:
    """Example i of a batch without the batch dimension."""
    return map_inputs(lambda t: t[i], x)


def unsqueeze(x: Any) -> Any:
    """One example (no batch dimension) as a batch of one: every tensor gets a leading 1."""
    return map_inputs(lambda t: t.unsqueeze(0), x)


def to_device(x: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Tensors on `device`; floating tensors in `dtype` when given (integer ids and masks keep theirs)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return map_inputs(move, x)


def stack(examples: list[Any]) -> Any:
    """Examples of one structure (no batch dimension) -> one batch; names the part whose shapes differ."""
    first = examples[0]
    if torch.is_tensor(first):
        shapes = {tuple(e.shape) for e in examples}
        if len(shapes) > 1:
            raise TracInError(f"examples have different shapes {sorted(shapes)[:4]} and cannot form a batch; "
                              "pad them to one length (for text: tokenizer(..., padding='max_length', "
                              "max_length=...)), or pass a DataLoader whose collate_fn pads "
                              "(e.g. transformers.DataCollatorWithPadding).")
        return torch.stack(examples)
    if isinstance(first, Mapping):
        out = {}
        for k in first:
            try:
                out[k] = stack([e[k] for e in examples])
            except TracInError as exc:
                raise TracInError(f"in '{k}': {exc}") from None
            except KeyError:
                raise TracInError(f"some examples lack the key '{k}'; every example needs the same keys.") from None
        return out
    return tuple(stack([e[j] for e in examples]) for j in range(len(first)))


def cat(batches: list[Any]) -> Any:
    """Concatenate batches of one structure along the batch dimension."""
    first = batches[0]
    if torch.is_tensor(first):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {k: cat([b[k] for b in batches]) for k in first}
    return tuple(cat([b[j] for b in batches]) for j in range(len(first)))


def as_tensors(x: Any, what: str, fix: str) -> Any:
    """Turn arrays, numbers and lists into tensors, keeping tuples and dicts; drop text values of dicts.

    Text (str) values of a dict (a 'text' column next to 'input_ids') cannot be model inputs, so they
    are left out. Anything else that is no tensor raises TracInError naming it, with `fix`.
    """
    if torch.is_tensor(x):
        return x
    if isinstance(x, Mapping):
        return {k: as_tensors(v, f"{what} '{k}'", fix) for k, v in x.items() if not _is_text(v)}
    if isinstance(x, tuple):
        return tuple(as_tensors(v, what, fix) for v in x)
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    try:
        return torch.as_tensor(x)
    except Exception as exc:  # noqa: BLE001
        raise TracInError(f"could not turn {what} of type {type(x).__name__} into a tensor; {fix}") from exc


def _is_text(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, (list, tuple)) and len(v) > 0 and isinstance(v[0], str))


def is_inputs(x: Any) -> bool:
    """Whether x is a tensor/array, or a non-empty tuple/list/dict made only of them."""
    if torch.is_tensor(x) or isinstance(x, np.ndarray):
        return True
    if isinstance(x, Mapping):
        return len(x) > 0 and all(is_inputs(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return len(x) > 0 and all(is_inputs(v) for v in x)
    return False


def describe(x: Any) -> str:
    """Short text of a structure with shapes and dtypes, e.g. "dict(input_ids (4, 12) int64, ...)"."""
    if torch.is_tensor(x) or isinstance(x, np.ndarray):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    if isinstance(x, Mapping):
        return "dict(" + ", ".join(f"{k}: {describe(v)}" for k, v in x.items()) + ")"
    if isinstance(x, (tuple, list)):
        return "tuple(" + ", ".join(describe(v) for v in x) + ")"
    return type(x).__name__
