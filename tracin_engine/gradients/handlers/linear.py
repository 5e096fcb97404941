"""Linear layers on inputs of any leading shape (B, *, in): dW_b = sum_t g_bt a_bt^T over the * positions.

Also transformers' Conv1D (GPT-2: y = x W + b with W (in, out)), registered by name: the same
gradient with the weight stored transposed.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_handler
from .base import KronHandler, bmm_into


class LinearHandler(KronHandler):
    """r = g_t (out), c = a_t (in); T = the product of the input's middle dimensions (1 for 2-D input)."""

    rank_one_hint = True   # a 2-D input gives one outer product per example (stored as its factors)
    position_wise = True   # acts on each position alone: (T, B, ...) and (B k, ...) are regrouped (hooks.batch_layouts)

    def shape(self) -> tuple[int, int]:
        w = self.module.weight
        return w.shape[0], w.shape[1]

    def rows(self, ctx, g):
        return g.reshape(g.shape[0], -1, g.shape[-1])

    def cols(self, ctx, g):
        return ctx.reshape(ctx.shape[0], -1, ctx.shape[-1])

    def fixed_positions(self, ctx):
        """A grid of positions (B, H, W, in): an image model's pointwise layer (ConvNeXt); a sequence's length
        (B, T, in) may change from batch to batch."""
        return ctx.dim() >= 4


class HFConv1DHandler(LinearHandler):
    """transformers.pytorch_utils.Conv1D: weight (in, out); as a Linear with weight W^T."""

    def shape(self) -> tuple[int, int]:
        w = self.module.weight
        return w.shape[1], w.shape[0]

    def to_params(self, W: torch.Tensor) -> torch.Tensor:
        return W.transpose(1, 2).flatten(1)

    def from_params(self, flat: torch.Tensor) -> torch.Tensor:
        R, C = self.shape()
        return flat.reshape(flat.shape[0], C, R).transpose(1, 2)

    def grad_into(self, ctx, g, out, accumulate=False):
        R, C = self.shape()   # the parameter's order is (C, R): dW_b^T = sum_t a_bt g_bt^T, one bmm
        bmm_into(out.unflatten(1, (C, R)), self.cols(ctx, g).transpose(1, 2), self.rows(ctx, g), accumulate)


register_handler(nn.Linear, LinearHandler)
register_handler("transformers.pytorch_utils.Conv1D", HFConv1DHandler)
