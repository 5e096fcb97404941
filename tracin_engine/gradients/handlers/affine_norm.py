"""Norm and scale layers of other libraries, by their structure: Hugging Face's LlamaRMSNorm, Qwen2RMSNorm,
MistralRMSNorm, GemmaRMSNorm (scale 1 + w), T5LayerNorm, a timm LayerNorm2d (channels first), timm's
LayerScale (gamma), DINOv2's LayerScale (lambda1), a user's own RMSNorm, ... : a module whose class name
ends in "Norm" or "Scale" (or "...1d/2d/3d"), with one 1-D scale parameter w (any name) and optionally a
1-D `bias` of the same size, no other parameters of its own and no sublayers.

Such a layer's output is elementwise affine in its parameters along one dimension d of the output
(the last, or the channels of a channels-first layout):

    y = y0 + u * w + v * b        (w, b broadcast along d; y0, u, v functions of the input only)

so, with g the gradient of y for one example,

    grad w = sum_{all dims but d} g * u,     grad b = sum g * v.

u, v and y0 are probed from the layer's own forward with substituted parameters, at every call:
y0 = f(x; w=0, b=0), u = f(x; w=1, b=0) - y0, v = f(x; w=0, b=1) - y0 (replaced.forward_with;
elementwise work, small beside the matmuls around it). The first call checks y == y0 + u w + v b:
a layer that is not affine in its scale is refused there (Unsupported: the hook path falls back).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .base import Unsupported, VectorHandler
from .registry import register_fallback
from .replaced import check_same_output, forward_with

_NAME = re.compile(r"(norm|scale)([123]d)?$", re.IGNORECASE)


def _roles(module: nn.Module) -> tuple[str, str | None] | None:
    """(scale, shift) local parameter names of a module this handler claims, else None: its class name
    ends in "Norm" or "Scale" (timm's LayerScale, gamma; DINOv2's LayerScale, lambda1), its own parameters
    are one 1-D scale (of 2 or more numbers) and optionally a 1-D `bias` of its size, and it has no sublayers."""
    own = dict(module.named_parameters(recurse=False))
    scales = [n for n in own if n != "bias"]
    if not _NAME.search(type(module).__name__) or len(scales) != 1 or any(True for _ in module.children()):
        return None
    w, b = own[scales[0]], own.get("bias")
    if w.dim() != 1 or w.numel() < 2 or (b is not None and b.shape != w.shape):
        return None
    return scales[0], ("bias" if b is not None else None)


class AffineNormHandler(VectorHandler):
    """ctx = (d, {name: u or v viewed (B, positions, D)}): the dimension the parameters run along and each
    parameter's multiplier; the probe is the output."""

    position_wise = True   # acts on each position alone: (T, B, ...) and (B k, ...) are regrouped (hooks.batch_layouts)

    @classmethod
    def claims(cls, module: nn.Module) -> bool:
        return _roles(module) is not None

    @classmethod
    def covered(cls, module: nn.Module) -> set[str]:
        return {n for n in (_roles(module) or ()) if n is not None}

    def present(self) -> list[str]:
        return [n for n, _ in self.module.named_parameters(recurse=False)]

    @classmethod
    def unsupported(cls, module, train_mode):
        if train_mode and ("batch" in type(module).__name__.lower() or hasattr(module, "running_mean")):
            return "a batch norm in train mode (batch statistics couple the examples)"
        return None

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.verified = False
        self.scale, self.shift = _roles(module)
        self.along: int | None = None    # the dimension found by _told where the last and dim 1 both fit

    def _dim(self, y: torch.Tensor, D: int, told) -> int:
        """The output dimension the parameters run along: the last or the channels (dim 1), whichever has their
        size; where both have it (a channels-first norm on a C x H x C grid) `told()` decides, once."""
        if y.dim() < 2:
            raise Unsupported(f"{type(self.module).__name__}: a {y.dim()}-D output has no position dimension")
        fits = [d for d in dict.fromkeys((y.dim() - 1, 1)) if y.shape[d] == D]
        if not fits:
            raise Unsupported(f"{type(self.module).__name__}: an output of shape {tuple(y.shape)} has no "
                              f"dimension of its parameters' size {D}")
        if len(fits) == 1:
            return fits[0]
        if self.along is None:
            self.along = told(fits)
        return self.along

    @staticmethod
    def _along(at, y0: torch.Tensor, u: torch.Tensor, w: torch.Tensor, fits: list[int]) -> int:
        """Which of the dimensions `fits` the scale runs along: the one where distinct scales 1..D (a probe of
        the layer's own forward) give y0 + u * scale."""
        ramp = torch.arange(1, w.numel() + 1, dtype=w.dtype, device=w.device)
        y = at(ramp, 0.0)
        for d in fits:
            shape = [1] * y.dim()
            shape[d] = -1
            if torch.allclose(y0 + u * ramp.reshape(shape), y, rtol=1e-4, atol=1e-5 * float(y.abs().max()) + 1e-12):
                return d
        raise Unsupported("the scale runs along neither dimension of its size (last or channels)")

    def capture(self, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise Unsupported(f"{type(self.module).__name__} returned {type(output).__name__}, not a tensor")
        own = dict(self.module.named_parameters(recurse=False))
        w = own[self.scale]
        with torch.no_grad():
            def at(wv: float | torch.Tensor, bv: float) -> torch.Tensor:
                sub = {self.scale: torch.full_like(w, wv) if isinstance(wv, float) else wv}
                if self.shift:
                    sub[self.shift] = torch.full_like(w, bv)
                return forward_with(self.module, sub, inputs, self.kwargs)
            try:
                y0 = at(0.0, 0.0)
                mult = {self.scale: at(1.0, 0.0) - y0}
                if self.shift:
                    mult[self.shift] = at(0.0, 1.0) - y0
            except Exception as e:             # (a regrouped input the layer's own forward does not take)
                raise Unsupported(f"{type(self.module).__name__}: probing its scale failed ({e})") from e
            d = self._dim(output, w.numel(), lambda fits: self._along(at, y0, mult[self.scale], w, fits))
            if not self.verified:
                shape = [1] * output.dim()
                shape[d] = -1
                ours = y0 + sum(m * own[n].reshape(shape) for n, m in mult.items())
                check_same_output(self.module, ours, output, "an elementwise-affine scale")
                self.verified = True
                u = mult[self.scale]
                if output.dtype == torch.float64 and bool(u.ne(0).any()) and bool((u.float().double() == u).all()):
                    self.computes_in = torch.float32   # a float64 model whose norm computes in float32 (Gemma)
        return d, {n: self._view(m, d) for n, m in mult.items()}

    @staticmethod
    def _view(t: torch.Tensor, d: int) -> torch.Tensor:
        """(B, ...) -> (B, positions, D), D along dimension d (> 0)."""
        return t.movedim(d, -1).reshape(t.shape[0], -1, t.shape[d])

    @staticmethod
    def batch_of(ctx: Any) -> int:
        return next(iter(ctx[1].values())).shape[0]

    def vector(self, ctx, g):
        d, mult = ctx
        g = self._view(g, d)
        parts = [(g * mult[n]).sum(1) for n in self.present()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


register_fallback(AffineNormHandler)
