"""Norm layers of other libraries, by their structure: Hugging Face's LlamaRMSNorm, Qwen2RMSNorm,
MistralRMSNorm, GemmaRMSNorm (scale 1 + w), T5LayerNorm, a timm LayerNorm2d (channels first), a user's
own RMSNorm, ... : a module whose class name ends in "Norm" (or "Norm1d/2d/3d"), with a 1-D `weight`
(and optionally a 1-D `bias` of the same size), no other parameters of its own and no sublayers.

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

_NAME = re.compile(r"norm([123]d)?$", re.IGNORECASE)


class AffineNormHandler(VectorHandler):
    """ctx = (d, u, v): the dimension and u, v viewed (B, positions, D) (v None without a bias); the probe
    is the output."""

    position_wise = True   # acts on each position alone: (T, B, ...) and (B k, ...) are regrouped (hooks.batch_layouts)

    @classmethod
    def claims(cls, module: nn.Module) -> bool:
        own = dict(module.named_parameters(recurse=False))
        w, b = own.get("weight"), own.get("bias")
        return (bool(_NAME.search(type(module).__name__)) and w is not None and w.dim() == 1
                and set(own) <= {"weight", "bias"} and (b is None or b.shape == w.shape)
                and not any(True for _ in module.children()))

    @classmethod
    def unsupported(cls, module, train_mode):
        if train_mode and ("batch" in type(module).__name__.lower() or hasattr(module, "running_mean")):
            return "a batch norm in train mode (batch statistics couple the examples)"
        return None

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.verified = False

    def _dim(self, y: torch.Tensor, D: int) -> int:
        """The output dimension the parameters run along: the last, else the channels (dim 1)."""
        if y.dim() < 2:
            raise Unsupported(f"{type(self.module).__name__}: a {y.dim()}-D output has no position dimension")
        if y.shape[-1] == D:
            return y.dim() - 1
        if y.shape[1] == D:
            return 1
        raise Unsupported(f"{type(self.module).__name__}: an output of shape {tuple(y.shape)} has no dimension "
                          f"of its parameters' size {D}")

    def capture(self, inputs, output):
        if not isinstance(output, torch.Tensor):
            raise Unsupported(f"{type(self.module).__name__} returned {type(output).__name__}, not a tensor")
        names = self.present()
        own = dict(self.module.named_parameters(recurse=False))
        w = own["weight"]
        with torch.no_grad():
            def at(wv: float, bv: float) -> torch.Tensor:
                sub = {"weight": torch.full_like(w, wv)}
                if "bias" in own:
                    sub["bias"] = torch.full_like(w, bv)
                return forward_with(self.module, sub, inputs, self.kwargs)
            try:
                y0 = at(0.0, 0.0)
                u = at(1.0, 0.0) - y0
                v = at(0.0, 1.0) - y0 if "bias" in own else None
            except Exception as e:             # (a regrouped input the layer's own forward does not take)
                raise Unsupported(f"{type(self.module).__name__}: probing its scale failed ({e})") from e
            d = self._dim(output, w.numel())
            if not self.verified:
                shape = [1] * output.dim()
                shape[d] = -1
                ours = y0 + u * w.reshape(shape) + (0 if v is None else v * own["bias"].reshape(shape))
                check_same_output(self.module, ours, output, "an elementwise-affine scale")
                self.verified = True
        return d, *(None if t is None or n not in names else self._view(t, d)
                    for n, t in (("weight", u), ("bias", v)))

    @staticmethod
    def _view(t: torch.Tensor, d: int) -> torch.Tensor:
        """(B, ...) -> (B, positions, D), D along dimension d (> 0)."""
        return t.movedim(d, -1).reshape(t.shape[0], -1, t.shape[d])

    @staticmethod
    def batch_of(ctx: Any) -> int:
        return next(t for t in ctx[1:] if t is not None).shape[0]

    def vector(self, ctx, g):
        d, u, v = ctx
        g = self._view(g, d)
        parts = [(g * t).sum(1) for t in (u, v) if t is not None]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


register_fallback(AffineNormHandler)
