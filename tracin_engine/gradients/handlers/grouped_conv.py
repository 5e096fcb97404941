"""Grouped and depthwise Conv1d / Conv2d (groups > 1: MobileNet, EfficientNet, ConvNeXt's 7x7, MobileViT).

The weight (O, C / G, kh, kw) is block diagonal over the G groups, not one Kronecker block, and small
(a depthwise 7x7 over 768 channels: 37,632 numbers), so its per-example gradient is computed exactly
(a VectorHandler): with the examples as further groups, one weight-gradient convolution

    dW_b[o, c, i, j] = sum_pos g_b[o, pos] x_b[group(o) C/G + c, stride pos + dilation (i, j) - padding]

(torch.nn.grad.conv2d_weight over (1, B C, H, W) with B G groups), and the bias gradient sum_pos g_b[o, pos].
The factored projection projects these rows by its seeded factor for vector blocks (factored.py).
"""

from __future__ import annotations

import torch

from .base import VectorHandler
from .conv_geometry import ConvGeometry


class GroupedConvHandler(ConvGeometry, VectorHandler):
    """ctx: the input as (B, C, H, W) (Conv1d: height 1); `vector` gives [dW_b, db_b] flattened."""

    def vector(self, ctx, g):
        m = self.module
        B, C = ctx.shape[:2]
        g = (g.unsqueeze(2) if self.one_d else g).to(ctx.dtype)                   # (B, O, H', W')
        O = g.shape[1]
        w = torch.nn.grad.conv2d_weight(ctx.reshape(1, B * C, *ctx.shape[2:]),
                                        (B * O, C // m.groups, *self.kernel),
                                        g.reshape(1, B * O, *g.shape[2:]), self.stride, self.padding,
                                        self.dilation, groups=B * m.groups)        # (B O, C / G, kh, kw)
        parts = [w.reshape(B, -1)]
        if "bias" in self.present():
            parts.append(g.flatten(2).sum(2))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
