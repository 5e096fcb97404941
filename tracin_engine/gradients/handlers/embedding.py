"""Embedding (V, D): dW_b = sum_t e_{x_bt} g_bt^T, only the rows of the tokens used; padding_idx gets none.

r_t is the one-hot of token x_t, so P_r^T r_t is row x_t of P_r (a lookup), and the exact gradient
is a scatter-add of g_t into row x_t; the (V,) one-hot is never formed on the fast paths. Positions
holding padding_idx contribute nothing (PyTorch gives that row no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_handler
from .base import KronHandler


class EmbeddingHandler(KronHandler):
    rank_one_hint = False
    sequence_first = True   # ids (T, B) are handled as (B, T) (hooks.sequence_first)
    sparse_grad = True  # grad_into touches only the rows of the tokens used: added after dense uses
    kronecker = False   # A = E[one-hot one-hot^T] is a V x V diagonal: not worth an eigendecomposition

    @classmethod
    def unsupported(cls, module, train_mode):
        if module.max_norm is not None:
            return "max_norm (renormalizes the weight during the forward pass)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq (couples the examples of a batch)"
        return None

    def capture(self, inputs, output):
        ids = inputs[0].detach()
        return ids.reshape(ids.shape[0], -1)

    def shape(self):
        return tuple(self.module.weight.shape)

    def _mask(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        p = self.module.padding_idx
        return None if p is None else (ids != p).to(dtype).unsqueeze(2)

    def _g(self, ids, g):
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        m = self._mask(ids, g.dtype)
        return g if m is None else g * m

    def rows(self, ctx, g):
        return F.one_hot(ctx, self.module.num_embeddings).to(g.dtype)

    def cols(self, ctx, g):
        return self._g(ctx, g)

    def positions(self, ctx, g):
        return ctx.shape[1]

    def proj_rows(self, ctx, g, P):
        z = P[ctx]                                                                 # (B, T, k_r)
        m = self._mask(ctx, z.dtype)
        return z if m is None else z * m

    def grad_matrix(self, ctx, g):
        gg = self._g(ctx, g)
        B, T, D = gg.shape
        V = self.module.num_embeddings
        rows = (ctx + torch.arange(B, device=ctx.device).unsqueeze(1) * V).reshape(-1)
        W = torch.zeros(B * V, D, dtype=gg.dtype, device=gg.device)
        return W.index_add_(0, rows, gg.reshape(-1, D)).reshape(B, V, D)

    def grad_into(self, ctx, g, out, accumulate=False):
        """Scatter-add g_bt into row x_bt of example b's (V, D) block of `out`: only the rows used are
        touched (after zeroing `out` when not accumulating onto a dense use of the same weight)."""
        gg = self._g(ctx, g)
        if not accumulate:
            out.zero_()
        b = torch.arange(ctx.shape[0], device=ctx.device).unsqueeze(1).expand_as(ctx)
        out.unflatten(1, self.shape()).index_put_((b, ctx), gg.to(out.dtype), accumulate=True)


register_handler(nn.Embedding, EmbeddingHandler)
