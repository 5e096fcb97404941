"""Layers whose forward the hook path replaces for its pass, to expose the products a fused kernel hides.

nn.LSTM's and nn.MultiheadAttention's kernels compute their weight products inside; a handler for such
a layer computes the same function from documented equations (a `Replacement`), whose intermediate
tensors (the probes) give the per-example gradients. Shared here:

    Replacement       the replacing forward; its first call is checked against the layer's own
                      forward (check_same_output), so a layer computing another function is refused
    ForwardOverride   the handle that installs it for one pass and restores the module afterwards
    ReplacedPart      a KronHandler for one weight of such a layer: r = the gradient of its probe,
                      c = what it multiplies, both read from Replacement.last[key]
    own_forward       why a subclass with its own forward cannot be replaced (its function is not ours)
    forward_with      the layer's own forward with substituted parameters, hooks not run (a probe)

Users: rnn.py (nn.LSTM / nn.GRU / nn.RNN), rnn_cell.py (their cells), attention.py (nn.MultiheadAttention).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ...devices import TF32_UNIT_ROUNDOFF, tf32_enabled
from .base import KronHandler, Unsupported


class Replacement:
    """Computes a module's forward(*args, **kwargs) from documented equations (`run`, in subclasses),
    keeping each part's (ctx, probe) in `last`; the first call also runs the module's own forward and
    checks that both agree (check_same_output on `main` of each output)."""

    what = "the replacement"   # named when the check fails

    def __init__(self, module: nn.Module):
        self.module = module
        self.last: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self.verified = False

    def run(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.run(*args, **kwargs)
        if not self.verified:
            with torch.no_grad():
                theirs = type(self.module).forward(self.module, *args, **kwargs)
            check_same_output(self.module, main(out), main(theirs), self.what)
            self.verified = True
        return out


def main(out: Any) -> Any:
    """The tensor an output is compared by: the first of a tuple (nn.LSTM's output sequence, nn.MultiheadAttention's
    attention output; nn.LSTMCell's h'), else the output itself."""
    return out[0] if isinstance(out, tuple) else out


def check_same_output(module: nn.Module, ours: Any, theirs: Any, what: str = "the replacement") -> None:
    """Refuse (Unsupported: the hook path then falls back) when the replacement does not give the module's
    own output (a kernel computing another function than the documented one). Tolerance, relative to the
    largest output (at least 1): 256 unit roundoffs in float32 / float64, 16 in half precision, 64 TF32
    roundoffs (2^-11) for float32 on CUDA with TF32 on (fused kernels and these matmuls may round
    differently); a wrong state or function differs by far more."""
    a, b = (t.data if isinstance(t, PackedSequence) else t for t in (ours, theirs))
    a = a.detach()
    eps = torch.finfo(a.dtype).eps
    unit = 256 * eps if a.dtype in (torch.float32, torch.float64) else 16 * eps
    if a.is_cuda and a.dtype == torch.float32 and tf32_enabled():
        unit = 64 * TF32_UNIT_ROUNDOFF
    b = b.detach()
    if getattr(b, "is_nested", False):       # a fast path's nested output (padding dropped): compare densely
        b = b.to_padded_tensor(0.0, a.shape)
    tol = unit * max(1.0, float(b.abs().max()) if b.numel() else 1.0)
    if a.shape != b.shape or not bool(((a - b).abs() <= tol).all()):
        raise Unsupported(f"{type(module).__name__}: {what} does not reproduce the layer's output")


class ForwardOverride:
    """A handle: module.forward replaced by `forward` (an instance attribute) until remove(), with the
    forward hook's handle removed too."""

    def __init__(self, module: nn.Module, forward: Any, handle: Any):
        self.module, self.handle = module, handle
        self.saved = module.__dict__.get("forward")
        module.forward = forward

    def remove(self) -> None:
        self.handle.remove()
        if self.saved is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.saved


def own_forward(module: nn.Module, bases: tuple[type, ...]) -> str | None:
    """Why a subclass cannot be replaced: it defines its own forward (its function is not the base's)."""
    base = next(b for b in bases if isinstance(module, b))
    return f"a subclass of {base.__name__} with its own forward" if type(module).forward is not base.forward else None


def forward_with(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, kwargs: dict | None = None) -> Any:
    """The module's forward with some of its own parameters replaced by `params`, under no_grad; its hooks
    do not run (a probe of the layer's function from inside its own hook: affine_norm.py, embedding.py)."""
    saved = {n: module._parameters[n] for n in params}
    try:
        module._parameters.update(params)
        with torch.no_grad():
            return module.forward(*args, **(kwargs or {}))
    finally:
        module._parameters.update(saved)


class ReplacedPart(KronHandler):
    """One weight (with its bias) of a replaced layer, r = the gradient of its probe, c = what it
    multiplies. The parts of a module share one Replacement: the first part's attach replaces the
    module's forward by Replacement.forward for the pass (the fused kernel does not run), every part's
    hook reads its (ctx, probe) from Replacement.last[key]. Subclasses give param_locals and has_bias."""

    def __init__(self, module: nn.Module, replacement: Replacement, key: Any, first: bool):
        super().__init__(module)
        self.replacement, self.key, self.first = replacement, key, first

    @classmethod
    def covered(cls, module) -> set[str]:
        return {n for n, _ in module.named_parameters(recurse=False)}

    def shape(self) -> tuple[int, int]:
        w = getattr(self.module, self.param_locals()[0])
        return w.shape[0], w.shape[1]

    def attach(self, hook):
        handle = self.module.register_forward_hook(hook)
        return ForwardOverride(self.module, self.replacement.forward, handle) if self.first else handle

    def record(self, inputs, output):
        return self.replacement.last[self.key]

    def rows(self, ctx, g):
        return g

    def cols(self, ctx, g):
        return ctx
