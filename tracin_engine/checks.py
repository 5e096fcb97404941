"""Checks of what users pass (devices, k, inputs), with errors that name the problem and the fix.

Example:
    >>> check_device("cuda")          # TracInError on a machine without CUDA
    >>> check_k(2.5)                   # TracInError: k must be a positive integer
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .errors import TracInError


def check_device(device: Any) -> None:
    """Raise TracInError if `device` (None, a string or torch.device) is malformed or absent here."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TracInError(f"device={device!r} is not a device name; use 'cpu', 'cuda' or 'cuda:0' "
                          "(or None to pick CUDA when present).") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TracInError(f"device={device!r} but CUDA is not available on this machine (torch "
                              f"{torch.__version__}, cuda build {torch.version.cuda}); use device='cpu' or None.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TracInError(f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1}).")


def check_k(k: Any, name: str = "k") -> int:
    """`k` as an int if it is a positive integer (Python or NumPy), else a TracInError."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise TracInError(f"{name} must be a positive integer, got {k!r}.")
    return int(k)


def explain_input_error(exc: Exception, x: torch.Tensor, model_dtype: torch.dtype,
                        train_shape: list[int] | None = None) -> TracInError | None:
    """After the model failed on inputs `x` (B, ...): a TracInError saying why when the cause is
    clear (integer inputs to a floating-point model; examples of another shape than the training
    examples `train_shape`), else None (re-raise the original error)."""
    if not x.is_floating_point() and model_dtype.is_floating_point and (
            x.dtype not in (torch.int64, torch.int32) or "type" in str(exc)):
        return TracInError(f"the inputs are {str(x.dtype).replace('torch.', '')} but the model computes in "
                           f"{str(model_dtype).replace('torch.', '')}; convert them as in training, e.g. "
                           "X.float() / 255 for uint8 images (the model said: "
                           f"{str(exc).splitlines()[0][:200]}).")
    if train_shape is not None and list(x.shape[1:]) != list(train_shape):
        return TracInError(f"these examples have shape {tuple(x.shape[1:])} but the training examples had "
                           f"{tuple(train_shape)}; pass examples shaped like the training data (the model said: "
                           f"{str(exc).splitlines()[0][:200]}).")
    return None
