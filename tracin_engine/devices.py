"""Where the engine computes, where its results go, and the TF32 policy (docs/gpu.md).

Example:
    >>> dev = resolve_device(None, model)          # the model's device, else CUDA when present, else CPU
    >>> scores = to_output(scores_on_gpu)          # the device contract: results live on the CPU
    >>> resolve_tf32("auto", projected=False)     # False: exact gradients get IEEE float32 products
    >>> with tf32_mode(False):                     # exact float32 products on CUDA
    ...     ...

The device contract: the engine computes on `TracIn(device=...)` (CUDA when present), but every
result it returns to the user (scores, top-k, self-influence, clusters, outliers, TracInIdeal's
matrices, test features) lives on the CPU, or on `out_device=` where a method takes one. So results
of a CUDA run and a CPU run can be compared, indexed with CPU tensors and plotted as they are.

The TF32 policy: on Ampere and later GPUs float32 matrix products and convolutions can run in
TF32 (inputs rounded to 10 mantissa bits, unit roundoff 2^-11 instead of 2^-24). `TracIn(tf32="auto")`
(the default) allows it for a projected index and forbids it for exact gradients: a projection of
proj_dim numbers already moves a score by about |g||g'|/sqrt(proj_dim) (1.6e-2 of the norms' product at
4096), ten times TF32's ~1e-3, while exact mode promises agreement with the CPU to float32 accuracy.
PyTorch itself runs cuDNN convolutions in TF32 by default, so a projected index then featurizes with
the convolutions its training step used (2-3x faster than IEEE float32 ones on an H200; docs/gpu.md).
`tf32=True` / `False` force either; rerank's exact rescoring (TracIn.exact) resolves "auto" as exact.
The flags are set only around the engine's own computations and restored afterwards.
agreement_tolerance() states how close a CUDA result must be to the CPU one under each setting.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .errors import TracInError

UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
                 torch.float16: 2.0 ** -11}
TF32_UNIT_ROUNDOFF = 2.0 ** -11  # TF32 keeps 10 explicit mantissa bits


def resolve_device(device: str | torch.device | None, model: torch.nn.Module | None = None) -> torch.device:
    """The computing device. None: the model's device when it is not the CPU (a model already on
    CUDA stays there), else CUDA when present, else the CPU. "cuda" without an index becomes the
    current CUDA device ("cuda:<torch.cuda.current_device()>"), so device comparisons are exact."""
    if device is None:
        first = next(iter(model.parameters()), None) if model is not None else None
        if first is not None and first.device.type not in ("cpu", "meta"):
            device = first.device
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def output_device(out_device: str | torch.device | None) -> torch.device:
    """Where results go: `out_device`, or the CPU when None (the device contract)."""
    return torch.device("cpu") if out_device is None else torch.device(out_device)


def to_output(t: torch.Tensor, out_device: str | torch.device | None = None) -> torch.Tensor:
    """A result tensor on the CPU (or `out_device`); no copy when it is already there."""
    return t.to(output_device(out_device))


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere. For timing."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tf32_flags() -> list[tuple[Any, str]]:
    """(object, attribute) of the TF32 switches this torch has: the fp32_precision API (torch >= 2.9)
    or the older allow_tf32 flags (never both: torch refuses a mix)."""
    cudnn = torch.backends.cudnn
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(cudnn, "conv"):
        return [(torch.backends.cuda.matmul, "fp32_precision"), (cudnn.conv, "fp32_precision"),
                (cudnn.rnn, "fp32_precision")]
    return [(torch.backends.cuda.matmul, "allow_tf32"), (cudnn, "allow_tf32")]


def tf32_enabled() -> bool:
    """Whether float32 CUDA matmuls may use TF32 now (the matmul switch)."""
    obj, attr = _tf32_flags()[0]
    value = getattr(obj, attr)
    return value == "tf32" if isinstance(value, str) else bool(value)


def resolve_tf32(tf32: bool | str, projected: bool) -> bool:
    """The TF32 policy as a bool: "auto" is True for a projected index, False for exact gradients."""
    if tf32 == "auto":
        return projected
    if isinstance(tf32, bool):
        return tf32
    raise TracInError(f"tf32 must be 'auto', True or False, got {tf32!r}.")


@contextmanager
def tf32_mode(enabled: bool) -> Iterator[None]:
    """Allow (True) or forbid (False) TF32 in CUDA float32 matmuls and cuDNN convolutions / RNNs
    inside the block; the previous flags are restored afterwards (also on error)."""
    flags = _tf32_flags()
    saved = [getattr(obj, attr) for obj, attr in flags]
    for obj, attr in flags:
        setattr(obj, attr, ("tf32" if enabled else "ieee") if attr == "fp32_precision" else bool(enabled))
    try:
        yield
    finally:
        for (obj, attr), value in zip(flags, saved):
            setattr(obj, attr, value)


def agreement_tolerance(tf32: bool, depth: int) -> float:
    """Relative tolerance (max |a - b| / max |b|) for a float32 CUDA result against the CPU one.

    Two float32 computations of inner products of length `depth` in different summation orders
    differ by about sqrt(depth) u (u = 2^-24) relative to the largest score; with TF32 every
    product's inputs are rounded to 2^-11 first, which adds about u_tf32 = 2^-11 whatever the
    length. The factor 64 covers the growth of these errors through a network's layers (forward,
    backward, projection, scoring):
        tol = 64 (sqrt(depth) 2^-24 + [tf32] 2^-11)
    e.g. depth 1,000: 1.2e-4 with TF32 off, 3.1e-2 with TF32 on.
    """
    return 64 * (math.sqrt(max(1, depth)) * UNIT_ROUNDOFF[torch.float32] + (TF32_UNIT_ROUNDOFF if tf32 else 0.0))
