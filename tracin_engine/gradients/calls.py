"""The one way the engine calls a model: inputs (tensor, tuple or dict) -> model -> output tensor.

Example:
    >>> out = call_model(model, state, {"input_ids": ids, "attention_mask": mask})   # model(**x)
    >>> out.shape                                       # e.g. (B, num_labels): the `logits`
    >>> call_model(model, state, (x1, x2))              # model(x1, x2)
    >>> call_model(model, None, x, output_fn=lambda o: o.start_logits)   # the live weights

What the model returns is turned into one tensor by `model_output`: a tensor as it is; a tuple or
list: its first element; a dict or a Hugging Face ModelOutput: its "logits"; output_fn=... picks
anything else (or overrides these rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.func import functional_call

from ..errors import TracInError
from ..inputs import describe

OutputFn = Callable[[Any], torch.Tensor]


def call_model(model: torch.nn.Module, state: Mapping[str, torch.Tensor] | None, inputs: Any,
               output_fn: OutputFn | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """model(x) / model(*x) / model(**x) with the weights in `state` (None: the model's own), then
    model_output. labels, when given, is passed as the keyword `labels` (sequence-to-sequence models
    build their decoder inputs from it). Returns the output tensor (B, ...)."""
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, tuple):
        args, kwargs = inputs, {}
    else:
        args, kwargs = (inputs,), {}
    if labels is not None:
        kwargs["labels"] = labels
    out = model(*args, **kwargs) if state is None else functional_call(model, state, args, kwargs)
    return model_output(out, output_fn)


def model_output(out: Any, output_fn: OutputFn | None = None) -> torch.Tensor:
    """The tensor to attribute from what the model returned (rules in the module docstring)."""
    if output_fn is not None:
        val = output_fn(out)
        if not torch.is_tensor(val):
            raise TracInError(f"output_fn returned a {type(val).__name__} for a model output of type "
                              f"{type(out).__name__}; it must return one tensor (B, ...), e.g. "
                              "output_fn=lambda out: out.logits.")
        return val
    if torch.is_tensor(out):
        return out
    if isinstance(out, Mapping):
        if torch.is_tensor(out.get("logits")):
            return out["logits"]
        keys = list(out.keys())
        raise TracInError(f"the model returned a {type(out).__name__} with keys {keys} and no 'logits'; pass "
                          f"output_fn=lambda out: out['{keys[0] if keys else 'name'}'] to TracIn to choose "
                          "the tensor to attribute.")
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TracInError(f"the model returned a {type(out).__name__} ({_short(out)}), not a tensor; pass "
                      "output_fn=... to TracIn mapping it to the output tensor (B, ...), "
                      "e.g. output_fn=lambda out: out[1].")


def _short(out: Any) -> str:
    try:
        return describe(out)
    except Exception:  # noqa: BLE001 - only for the message
        return repr(out)[:80]
