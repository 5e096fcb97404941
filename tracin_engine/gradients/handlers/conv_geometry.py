"""The arithmetic shared by the convolution handlers: a Conv1d viewed as a Conv2d of height 1."""

from __future__ import annotations

from torch import nn


def _pair(v, one_d: bool, fill: int):
    return (fill, v[0]) if one_d else tuple(v)


class ConvGeometry:
    """A Conv1d as a Conv2d of height 1: kernel, stride, padding, dilation as pairs; inputs (B, C, 1, L).
    Shared by conv.ConvHandler and grouped_conv.GroupedConvHandler (listed first among their bases)."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        one_d = isinstance(module, nn.Conv1d)
        self.one_d = one_d
        self.kernel = _pair(module.kernel_size, one_d, 1)
        self.stride = _pair(module.stride, one_d, 1)
        self.padding = _pair(module.padding, one_d, 0)
        self.dilation = _pair(module.dilation, one_d, 1)

    def capture(self, inputs, output):
        a = inputs[0].detach()
        return a.unsqueeze(2) if self.one_d else a
