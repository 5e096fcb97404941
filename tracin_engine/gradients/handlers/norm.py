"""Normalization layers' scale and shift (exact, they are small): grad w = sum g * x_hat, grad b = sum g.

x_hat is the normalized input the layer multiplies by its scale, recomputed in the forward hook:
    LayerNorm:  (x - mean) / sqrt(var + eps) over normalized_shape
    GroupNorm:  the same over each group of channels (and all positions)
    BatchNorm:  (x - running_mean) / sqrt(running_var + eps) per channel (eval mode only: in train
                mode batch statistics couple the examples, so there is no per-example gradient)
    RMSNorm:    x / sqrt(mean(x^2) + eps) over normalized_shape
Sums run over every dimension but the batch and the parameter's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_handler
from .base import VectorHandler


class _Norm(VectorHandler):
    """Subclasses give x_hat (B, ...) and `view`: how x_hat and g are viewed as (B, positions, n)."""

    exact_forward = True   # x_hat recomputes the layer's own function: a subclass with its own forward is not ours

    def x_hat(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B, -1, n): positions x parameter entries."""
        raise NotImplementedError

    def capture(self, inputs, output):
        with torch.no_grad():
            return self.view(self.x_hat(inputs[0].detach()))

    def vector(self, ctx, g):
        g = self.view(g)
        parts = [(g * ctx).sum(1) if n == "weight" else g.sum(1) for n in self.present()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class LayerNormHandler(_Norm):
    position_wise = True   # acts on each position alone: (T, B, ...) and (B k, ...) are regrouped (hooks.batch_layouts)

    def x_hat(self, x):   # the layer's own fused kernel without its scale and shift (a var_mean is ~4x slower)
        return F.layer_norm(x, self.module.normalized_shape, None, None, self.module.eps)

    def view(self, t):
        n = 1
        for s in self.module.normalized_shape:
            n *= s
        return t.reshape(t.shape[0], -1, n)


class RMSNormHandler(LayerNormHandler):
    def x_hat(self, x):
        return F.rms_norm(x, self.module.normalized_shape, None, self.module.eps)   # eps None: finfo(dtype).eps


class _Channel(_Norm):
    """Per-channel parameters (dim 1): view (B, C, ...) as (B, positions, C)."""

    def view(self, t):
        return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


class GroupNormHandler(_Channel):
    def x_hat(self, x):
        return F.group_norm(x, self.module.num_groups, None, None, self.module.eps)


class BatchNormHandler(_Channel):
    @classmethod
    def unsupported(cls, module, train_mode):
        if train_mode:
            return "BatchNorm in train mode (batch statistics couple the examples)"
        if not module.track_running_stats or module.running_mean is None:
            return "BatchNorm without running statistics (uses batch statistics)"
        return None

    def x_hat(self, x):
        m = self.module
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)


register_handler(nn.LayerNorm, LayerNormHandler)
register_handler(nn.GroupNorm, GroupNormHandler)
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
    register_handler(_bn, BatchNormHandler)
if hasattr(nn, "RMSNorm"):
    register_handler(nn.RMSNorm, RMSNormHandler)
