"""Conv1d and Conv2d (zero padding given as numbers): t = output positions, c = unfolded patches.
Grouped convolutions (groups > 1) are exact vectors instead (grouped_conv.py).

The projected columns P_c^T c_t at every position are a convolution of the input with P_c as k_c
filters (C, kh, kw) and the bias row as the conv bias, so patches are never unfolded for projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_handler
from .base import KronHandler, bmm_into
from .conv_geometry import ConvGeometry
from .grouped_conv import GroupedConvHandler


GROUPED_MIN_POSITIONS = 256   # output positions per example from which grad_into uses a grouped convolution
                              # (measured on the CPU: unfold + bmm wins below, e.g. 8x8 at 256 channels)


class ConvHandler(ConvGeometry, KronHandler):
    """Conv1d runs as a Conv2d of height 1: the same unfold and filter arithmetic."""

    rank_one_hint = False

    @classmethod
    def unsupported(cls, module, train_mode):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}"
        return None

    @classmethod
    def parts(cls, module):
        """A grouped convolution's weight is block diagonal: exact vectors instead (grouped_conv.py)."""
        return [GroupedConvHandler(module)] if module.groups > 1 else [cls(module)]

    def shape(self):
        m = self.module
        return m.out_channels, m.in_channels * self.kernel[0] * self.kernel[1]

    def rows(self, ctx, g):
        return g.flatten(2).transpose(1, 2)                                        # (B, L, O)

    def cols(self, ctx, g):
        return F.unfold(ctx, self.kernel, self.dilation, self.padding, self.stride).transpose(1, 2)

    def positions(self, ctx, g):
        return g.flatten(2).shape[2]

    def fixed_positions(self, ctx):
        return True   # T = output positions, the same for every batch of equally sized inputs

    def proj_cols(self, ctx, g, P, p_bias):
        k = P.shape[1]
        filt = P.T.reshape(k, self.module.in_channels, *self.kernel)
        z = F.conv2d(ctx, filt, p_bias, self.stride, self.padding, self.dilation)  # (B, k, H', W')
        return z.flatten(2).transpose(1, 2)

    def grad_matrix(self, ctx, g):
        U = F.unfold(ctx, self.kernel, self.dilation, self.padding, self.stride)  # (B, Ckk, L)
        return torch.bmm(g.flatten(2), U.transpose(1, 2))                          # (B, O, Ckk)

    def grad_into(self, ctx, g, out, accumulate=False):
        B, O = g.shape[:2]
        if g[0, 0].numel() >= GROUPED_MIN_POSITIONS and g.dtype == ctx.dtype == out.dtype:
            # many output positions: one weight-gradient convolution with the examples as groups (the
            # backend's own kernel) beats unfolding (B, C k k, L) patches: 3.3x at 32x32, 64 channels
            C, g2 = ctx.shape[1], g.unsqueeze(2) if self.one_d else g                  # (B, O, H', W')
            w = torch.nn.grad.conv2d_weight(ctx.reshape(1, B * C, *ctx.shape[2:]), (B * O, C, *self.kernel),
                                            g2.reshape(1, B * O, *g2.shape[2:]), self.stride, self.padding,
                                            self.dilation, groups=B)              # (B O, C, kh, kw)
            out.add_(w.reshape(B, -1)) if accumulate else out.copy_(w.reshape(B, -1))
            return
        U = F.unfold(ctx, self.kernel, self.dilation, self.padding, self.stride)  # (B, Ckk, L)
        bmm_into(out.unflatten(1, self.shape()), g.flatten(2), U.transpose(1, 2), accumulate)

    def bias_grad(self, ctx, g):
        return g.flatten(2).sum(2)


register_handler(nn.Conv1d, ConvHandler)
register_handler(nn.Conv2d, ConvHandler)
