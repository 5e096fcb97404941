"""nn.MultiheadAttention (and so nn.TransformerEncoderLayer / DecoderLayer / nn.Transformer): its input
projection is a Kronecker block, its output projection the Linear child it already has.

With embed dimension E and the packed weight W = [W_q; W_k; W_v] (3E, E), bias b (3E,),
    q_t = W_q x_t + b_q,   k_s = W_k y_s + b_k,   v_s = W_v z_s + b_v
for query positions t (input x) and key / value positions s (inputs y, z), so per example
    dW = [sum_t dq_t x_t^T ; sum_s dk_s y_s^T ; sum_s dv_s z_s^T]
one Kronecker block over positions whose row-side vectors are zero outside their third:
    r = [dq_t, 0, 0] with c = x_t,  [0, dk_s, 0] with c = y_s,  [0, 0, dv_s] with c = z_s
and, for self-attention (x, y, z the same tensor), r_t = [dq_t, dk_t, dv_t] with c = x_t (T positions, not 3T).
A key that is also the value shares positions the same way ([0, dk_s, dv_s] with c = y_s).

PyTorch's forward reads out_proj.weight directly (the child's hooks never run) and hides q, k, v, so
for the hook path's pass the module's forward is replaced (replaced.py) by the same computation: the
projections as tensors (their gradients are the r above), the attention itself (masks as PyTorch
merges them; scaled_dot_product_attention, or the explicit softmax when weights are asked for), and
out_proj called as a module, so the Linear handler computes its block. The first call is checked
against PyTorch's own forward.

Not handled (their parameters take the generic path): key / value dimensions other than E (separate
q/k/v weights), add_bias_kv, add_zero_attn, attention dropout in train mode, subclasses with their own
forward; unbatched (2-D) inputs at run time (the hook path then stops and featurization falls back).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Unsupported
from .registry import register_handler
from .replaced import Replacement, ReplacedPart, own_forward


class Attention(Replacement):
    """nn.MultiheadAttention's forward from its equations, keeping (ctx (B, T', E), probe (B, T', 3E))
    of the input projection in last["in_proj"] (T' = T for self-attention, else the query, key and
    value positions one after another)."""

    what = "the unfused attention"

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
            attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
            is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.module
        if query.dim() != 3:
            raise Unsupported(f"{type(m).__name__} given an unbatched {query.dim()}-D query: not handled")
        same_kv = key is value
        same = same_kv and query is key
        if not m.batch_first:                          # (T, B, E) -> (B, T, E)
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value, same, same_kv)
        out, weights = attend(q, k, v, m.num_heads, _merged_mask(m, q, k, key_padding_mask, attn_mask,
                                                                 need_weights, is_causal),
                              need_weights, average_attn_weights)
        out = m.out_proj(out)                          # a module call: its Linear handler sees (B, T, E)
        return (out if m.batch_first else out.transpose(0, 1)), weights

    def _project(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, same: bool, same_kv: bool):
        """q (B, L, E), k, v (B, S, E) from the packed weight; records the block's (ctx, probe)."""
        m = self.module
        W, b = m.in_proj_weight, m.in_proj_bias
        E = m.embed_dim
        if same:                                       # self-attention: one product, T positions
            qkv = F.linear(x, W, b)                                                   # (B, T, 3E)
            self.last = {"in_proj": (x.detach(), qkv)}
            return qkv.split(E, -1)
        bs = (None, None, None) if b is None else b.split(E)
        Ws = W.split(E)
        inputs = [x, y] if same_kv else [x, y, z]
        L, S = x.shape[1], y.shape[1]
        Z = x.new_zeros(x.shape[0], L + S * (len(inputs) - 1), 3 * E).requires_grad_(True)   # dL/dZ = r
        q = F.linear(x, Ws[0], bs[0]) + Z[:, :L, :E]
        if same_kv:
            kv = F.linear(y, W[E:], None if b is None else b[E:]) + Z[:, L:, E:]
            k, v = kv.split(E, -1)
        else:
            k = F.linear(y, Ws[1], bs[1]) + Z[:, L:L + S, E:2 * E]
            v = F.linear(z, Ws[2], bs[2]) + Z[:, L + S:, 2 * E:]
        self.last = {"in_proj": (torch.cat([t.detach() for t in inputs], 1), Z)}
        return q, k, v


def _merged_mask(m: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, key_padding_mask: Any,
                 attn_mask: Any, need_weights: bool, is_causal: bool) -> torch.Tensor | bool | None:
    """The additive mask (B or 1, heads or 1, L, S) PyTorch's multi_head_attention_forward builds from
    attn_mask ((L, S) or (B heads, L, S)) and key_padding_mask ((B, S)), boolean ones (True = not
    attended) as -inf; True for SDPA's own causal mask (is_causal, no padding mask, no weights asked)."""
    B, L, S, h = q.shape[0], q.shape[1], k.shape[1], m.num_heads
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (nn.MultiheadAttention).")
    if is_causal and key_padding_mask is None and not need_weights:
        return True
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, q.dtype)
        mask = mask.reshape(1, 1, L, S) if mask.dim() == 2 else mask.reshape(B, h, L, S)
    if key_padding_mask is not None:
        pad = _additive(key_padding_mask, q.dtype).reshape(B, 1, 1, S)
        mask = pad if mask is None else mask + pad
    return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = masked) as 0 / -inf of `dtype`; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | bool | None,
           need_weights: bool, average: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q_h k_h^T / sqrt(d) + mask) v_h per head h, concatenated: (B, L, E), and the attention
    weights (B, L, S) (averaged over heads) or (B, heads, L, S) when need_weights, else None.
    q (B, L, E), k and v (B, S, E); mask as _merged_mask gives it (True: causal)."""
    B, L, E = q.shape
    d = E // heads
    qh, kh, vh = (t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v))    # (B, heads, T, d)
    if need_weights:
        scores = (qh * math.sqrt(1.0 / d)) @ kh.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        w = scores.softmax(-1)
        out = w @ vh
        weights = w.mean(1) if average else w
    else:
        causal = mask is True
        out = F.scaled_dot_product_attention(qh, kh, vh, None if causal else mask, 0.0, causal)
        weights = None
    return out.transpose(1, 2).reshape(B, L, E), weights


class AttentionHandler(ReplacedPart):
    """in_proj_weight (3E, E) with in_proj_bias: r = the projections' gradients (3E,), c = the input
    (see the module docstring); out_proj is its own Linear block."""

    rank_one_hint = False

    @classmethod
    def unsupported(cls, module, train_mode):
        why = own_forward(module, (nn.MultiheadAttention,))
        if why:
            return why
        if not module._qkv_same_embed_dim:
            return "key / value dimensions other than embed_dim (separate q, k, v weights)"
        if module.bias_k is not None:
            return "add_bias_kv"
        if module.add_zero_attn:
            return "add_zero_attn"
        if train_mode and module.dropout:
            return "attention dropout in train mode"
        return None

    @classmethod
    def covered(cls, module) -> set[str]:
        return {"in_proj_weight", "in_proj_bias"}

    @classmethod
    def parts(cls, module) -> list["AttentionHandler"]:
        return [cls(module, Attention(module), "in_proj", True)]

    @property
    def has_bias(self) -> bool:
        return self.module.in_proj_bias is not None

    def param_locals(self) -> tuple[str, str | None]:
        return "in_proj_weight", ("in_proj_bias" if self.has_bias else None)


register_handler(nn.MultiheadAttention, AttentionHandler)
