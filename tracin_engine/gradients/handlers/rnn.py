"""Recurrent layers (nn.LSTM, nn.GRU, nn.RNN): each weight's per-example gradient is a sum over time steps.

For layer l and direction d, the input-side and hidden-side pre-activations of every step are
    gi_t = W_ih x_t + b_ih        (G H,)   x_t the layer's input at step t
    gh_t = W_hh h_prev_t + b_hh   (G H,)   h_prev_t the hidden state the step starts from
(G = 4 gates for LSTM, 3 for GRU, 1 for RNN), so
    dW_ih = sum_t dgi_t x_t^T,    dW_hh = sum_t dgh_t h_prev_t^T,    db = sum_t d(.)_t
with dgi_t, dgh_t the gradients of the objective with respect to gi_t and gh_t: two Kronecker blocks
per layer and direction, each like a Linear on a sequence (T = the sequence length).

PyTorch's fused kernels keep gi_t and gh_t inside, so during the hook path's pass the module's forward
is replaced by the same recurrence computed step by step in Python (RNNUnroll, the documented
equations of each cell; its first call is checked against the fused kernel), which exposes them: gi
as one (B, T, G H) tensor, gh through a zero probe Z (B, T, G H) added to every step (gh_t + Z_t = gh_t
exactly; dL/dZ_t = dgh_t). One handler instance per (layer, direction, side) shares one RNNUnroll per
module; the first part installs the replacement (attach), every part's hook reads its results.

A PackedSequence input is run padded, each example's state frozen past its length (outputs there are
zero and not packed; gradients there are zero), and the output packed back in PyTorch's own layout.
The cells (nn.LSTMCell, nn.GRUCell, nn.RNNCell) are handled the same way one call at a time (rnn_cell.py).
Not handled: unbatched (2-D) inputs (at run time: the hook path then stops and featurization falls back
to vmap / the loop), LSTM proj_size, dropout between layers in train mode and subclasses with their
own forward (their parameters take the generic path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from .base import Unsupported
from .replaced import Replacement, ReplacedPart, own_forward
from .registry import register_handler

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class RNNUnroll(Replacement):
    """nn.LSTM / nn.GRU / nn.RNN step by step, keeping for every (layer, direction): the layer input x
    (B, T, in), the step-start hidden states h_prev (B, T, H), gi (B, T, G H) and the probe Z."""

    what = "the step-by-step recurrence"

    def __init__(self, module: nn.RNNBase):
        super().__init__(module)
        self.active: torch.Tensor | None = None   # (T, B, 1) bool: steps within each packed sequence

    def run(self, input: Any, hx: Any = None) -> Any:
        """The module's output for forward(input, hx) (input (B, T, in) / (T, B, in) or a PackedSequence,
        optional initial state as PyTorch takes it), computed step by step; fills `last`."""
        m = self.module
        x, packed, lengths = input, None, None
        if isinstance(x, PackedSequence):         # as padded (B, T, in) in the caller's order, masked by length
            packed = x
            x, lengths = pad_packed_sequence(x, batch_first=True)
        elif not isinstance(x, torch.Tensor):
            raise Unsupported(f"{type(m).__name__} given a {type(x).__name__}: not handled")
        elif x.dim() != 3:
            raise Unsupported(f"{type(m).__name__} given an unbatched {x.dim()}-D input: not handled")
        elif not m.batch_first:
            x = x.transpose(0, 1)
        B, T = x.shape[:2]
        self.active = None if lengths is None else (
            torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).to(x.device).unsqueeze(2)   # (T, B, 1)
        D, H, L = 2 if m.bidirectional else 1, m.hidden_size, m.num_layers
        lstm = m.mode == "LSTM"
        h0, c0 = (hx if hx is not None else (None, None)) if lstm else (hx, None)
        zeros = x.new_zeros(L * D, B, H)
        h0 = zeros if h0 is None else h0
        c0 = zeros if (lstm and c0 is None) else c0
        self.last = {}
        h_n, c_n = [], []
        layer_in = x
        for l in range(L):
            outs = []
            for d in range(D):
                out, h, c = self._direction(layer_in, l, d, h0[l * D + d], None if c0 is None else c0[l * D + d])
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_in = outs[0] if D == 1 else torch.cat(outs, 2)
        if packed is not None:                    # PyTorch's layout: per step, the active examples in sorted order
            order = packed.sorted_indices if packed.sorted_indices is not None else torch.arange(B)
            data = torch.cat([layer_in[order[:n].to(x.device), t] for t, n in enumerate(packed.batch_sizes.tolist())])
            output = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
        else:
            output = layer_in if m.batch_first else layer_in.transpose(0, 1)
        hn = torch.stack(h_n)
        return (output, (hn, torch.stack(c_n))) if lstm else (output, hn)

    def _direction(self, x: torch.Tensor, l: int, d: int, h: torch.Tensor, c: torch.Tensor | None):
        m = self.module
        sfx = f"_l{l}" + ("_reverse" if d else "")
        W_ih, W_hh = getattr(m, "weight_ih" + sfx), getattr(m, "weight_hh" + sfx)
        b_ih = getattr(m, "bias_ih" + sfx) if m.bias else None
        b_hh = getattr(m, "bias_hh" + sfx) if m.bias else None
        T = x.shape[1]
        gi = torch.nn.functional.linear(x, W_ih, b_ih)                                  # (B, T, G H)
        Z = torch.zeros_like(gi).requires_grad_(True)                                   # dL/dZ_t = dgh_t
        steps = range(T - 1, -1, -1) if d else range(T)
        outs: list[torch.Tensor | None] = [None] * T
        prev: list[torch.Tensor | None] = [None] * T
        gi_t = gi.unbind(1)                     # one backward node each (a stack), not T slice-backwards
        Zb_t = (Z if b_hh is None else Z + b_hh).unbind(1)
        W_t = W_hh.t()
        for t in steps:
            prev[t] = h.detach()
            gh = torch.addmm(Zb_t[t], h, W_t)                                           # W_hh h + b_hh + Z_t
            h_new, c_new = cell_step(m.mode, gi_t[t], gh, h, c)
            if self.active is None:
                h, c = h_new, c_new
                outs[t] = h
            else:                                 # past an example's length: state kept, output zero
                on = self.active[t]
                h = torch.where(on, h_new, h)
                c = None if c is None else torch.where(on, c_new, c)
                outs[t] = torch.where(on, h_new, torch.zeros_like(h_new))
        self.last[(l, d, "ih")] = (x.detach(), gi)
        self.last[(l, d, "hh")] = (torch.stack(prev, 1), Z)
        return torch.stack(outs, 1), h, c


def cell_step(mode: str, gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
    """One step of PyTorch's cells (docs of nn.LSTM / nn.GRU / nn.RNN): (h', c')."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    pre = gi + gh
    return (torch.tanh(pre) if mode == "RNN_TANH" else torch.relu(pre)), None


class RecurrentPart(ReplacedPart):
    """One weight of a recurrent module (rnn.py, rnn_cell.py): r = the gradient of its pre-activation."""

    kronecker = True    # EK-FAC: the time steps (or a cell's calls) as positions, as for a Linear on a sequence

    @property
    def has_bias(self) -> bool:
        return bool(self.module.bias)


class RNNHandler(RecurrentPart):
    """One (layer, direction, side) of an RNN module: r_t = dgi_t or dgh_t (G H), c_t = x_t or h_prev_t."""

    rank_one_hint = False

    @classmethod
    def unsupported(cls, module, train_mode):
        if module.mode not in GATES:
            return f"mode {module.mode!r}"
        why = own_forward(module, (nn.LSTM, nn.GRU, nn.RNN, nn.RNNBase))
        if why:
            return why
        if getattr(module, "proj_size", 0):
            return "proj_size (projected LSTM hidden states)"
        if train_mode and module.dropout and module.num_layers > 1:
            return "dropout between layers in train mode"
        return None

    @classmethod
    def parts(cls, module) -> list["RNNHandler"]:
        unroll = RNNUnroll(module)
        keys = [(l, d, side) for l in range(module.num_layers) for d in range(2 if module.bidirectional else 1)
                for side in ("ih", "hh")]
        return [cls(module, unroll, key, i == 0) for i, key in enumerate(keys)]

    def param_locals(self) -> tuple[str, str | None]:
        layer, direction, side = self.key
        sfx = f"_{side}_l{layer}" + ("_reverse" if direction else "")
        return "weight" + sfx, ("bias" + sfx) if self.has_bias else None


for _cls in (nn.LSTM, nn.GRU, nn.RNN):
    register_handler(_cls, RNNHandler)
