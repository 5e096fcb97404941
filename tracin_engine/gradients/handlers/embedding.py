"""Embedding (V, D): dW_b = sum_t e_{x_bt} g_bt^T, only the rows of the tokens used; padding_idx gets none.

r_t is the one-hot of token x_t, so P_r^T r_t is row x_t of P_r (a lookup), and the exact gradient
is a scatter-add of g_t into row x_t; the (V,) one-hot is never formed on the fast paths. Positions
holding padding_idx contribute nothing (PyTorch gives that row no gradient).

A subclass with its own forward (Gemma's embedding times sqrt(D), OPT's positions computed from the
attention mask) is probed at each call: its forward with a weight of ones gives the scale s, with the
row numbers as weight the ids it looked up (replaced.forward_with); y = s * E[ids] is checked, with
one s (D,) at every position, and then c_t = s * g_t.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_handler
from .base import KronHandler, Unsupported
from .replaced import check_same_output, forward_with


class EmbeddingHandler(KronHandler):
    rank_one_hint = False
    position_wise = True   # acts on each position alone: (T, B, ...) and (B k, ...) are regrouped (hooks.batch_layouts)
    sparse_grad = True  # grad_into touches only the rows of the tokens used: added after dense uses
    kronecker = True    # EK-FAC: S = E[c c^T] (D x D) and A = E[one-hot one-hot^T], a diagonal: token counts
    one_hot_rows = True  # (methods/ekfac.py takes the ids, never the (V,) one-hots)

    @classmethod
    def unsupported(cls, module, train_mode):
        if module.max_norm is not None:
            return "max_norm (renormalizes the weight during the forward pass)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq (couples the examples of a batch)"
        return None

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.scale: torch.Tensor | None = None   # s (D,) of a subclass that scales the rows it looks up

    def capture(self, inputs, output):
        if type(self.module).forward is not nn.Embedding.forward:
            return self._probe(inputs, output)
        ids = inputs[0].detach()
        return ids.reshape(ids.shape[0], -1)

    def _probe(self, inputs: tuple, output: Any) -> torch.Tensor:
        """(B, T) ids a subclass's own forward looked up, and its scale s: probed through the forward with
        the weight replaced by ones (y = s) and by the row numbers (y = s * ids); refused unless
        y = s * E[ids] with one s (D,) at every position."""
        m = self.module
        name = f"{type(m).__name__} (a subclass of nn.Embedding with its own forward)"
        V, D = m.weight.shape
        S = forward_with(m, {"weight": torch.ones(1, 1, dtype=m.weight.dtype, device=m.weight.device).expand(V, D)},
                         inputs, self.kwargs)
        if not (isinstance(S, torch.Tensor) and isinstance(output, torch.Tensor) and S.shape == output.shape
                and S.dim() >= 2 and S.shape[-1] == D):
            raise Unsupported(f"{name} does not return looked-up rows")
        s = S.reshape(-1, D)[0]
        check_same_output(m, S, s.expand_as(S), "one scale per dimension")
        j = int(s.abs().argmax())
        if float(s[j]) == 0:
            raise Unsupported(f"{name} returns zeros")
        rows = torch.arange(V, dtype=torch.float64, device=m.weight.device).unsqueeze(1).expand(V, D)
        found = forward_with(m, {"weight": rows}, inputs, self.kwargs)[..., j].double() / float(s[j])
        ids = found.round()
        if not bool(((found - ids).abs() <= 1e-6).all()) or bool((ids < 0).any()) or bool((ids >= V).any()):
            raise Unsupported(f"{name} does not return looked-up rows")
        ids = ids.long().reshape(output.shape[0], -1)
        with torch.no_grad():
            mine = F.embedding(ids, m.weight, m.padding_idx).reshape(output.shape) * s
        check_same_output(m, mine, output, "a scaled lookup")
        self.scale = None if bool((s == 1).all()) else s
        return ids

    def shape(self):
        return tuple(self.module.weight.shape)

    def _mask(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        p = self.module.padding_idx
        return None if p is None else (ids != p).to(dtype).unsqueeze(2)

    def _g(self, ids, g):
        g = g.reshape(g.shape[0], -1, g.shape[-1])
        if self.scale is not None:
            g = g * self.scale.to(g.dtype)
        m = self._mask(ids, g.dtype)
        return g if m is None else g * m

    def rows(self, ctx, g):
        return F.one_hot(ctx, self.module.num_embeddings).to(g.dtype)

    def cols(self, ctx, g):
        return self._g(ctx, g)

    def positions(self, ctx, g):
        return ctx.shape[1]

    def ids(self, ctx) -> torch.Tensor:
        """(B, T) token ids, -1 where padding_idx (no gradient there)."""
        p = self.module.padding_idx
        return ctx if p is None else ctx.masked_fill(ctx == p, -1)

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
