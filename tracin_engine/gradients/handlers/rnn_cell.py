"""Recurrent cells (nn.LSTMCell, nn.GRUCell, nn.RNNCell) stepped by the model's own loop (a decoder's pattern).

Each call computes gi = W_ih x + b_ih and gh = W_hh h + b_hh (G H,) and one step of the cell (rnn.py's
cell_step), so per example
    dW_ih = sum over calls of dgi x^T,    dW_hh = sum over calls of dgh h^T
two Kronecker blocks whose positions are the calls (one call: rank one, stored as its two factors).
As for nn.LSTM (rnn.py), during the hook path's pass the cell's forward is replaced by these equations
(gh through a zero probe Z), the first call checked against the fused kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Unsupported
from .registry import register_handler
from .replaced import Replacement, own_forward
from .rnn import RecurrentPart, cell_step


class CellStep(Replacement):
    """One call of nn.LSTMCell / nn.GRUCell / nn.RNNCell computed with the cell equations (cell_step), keeping
    for each side its (ctx (B, 1, C), probe (B, G H)): x and gi = W_ih x + b_ih, h and a zero probe Z with
    gh = W_hh h + b_hh + Z. Called once per step of the user's own loop; every call is its own position."""

    what = "the cell equations"

    def __init__(self, module: nn.RNNCellBase):
        super().__init__(module)
        self.mode = cell_mode(module)

    def run(self, input: torch.Tensor, hx: Any = None) -> Any:
        m = self.module
        if input.dim() != 2:
            raise Unsupported(f"{type(m).__name__} given an unbatched {input.dim()}-D input: not handled")
        lstm = self.mode == "LSTM"
        zeros = input.new_zeros(input.shape[0], m.hidden_size)
        h, c = (hx if hx is not None else (zeros, zeros)) if lstm else (zeros if hx is None else hx, None)
        gi = torch.nn.functional.linear(input, m.weight_ih, m.bias_ih)
        Z = torch.zeros_like(gi).requires_grad_(True)
        gh = torch.addmm(Z if m.bias_hh is None else Z + m.bias_hh, h, m.weight_hh.t())
        h_new, c_new = cell_step(self.mode, gi, gh, h, c)
        self.last = {"ih": (input.detach().unsqueeze(1), gi), "hh": (h.detach().unsqueeze(1), Z)}
        return (h_new, c_new) if lstm else h_new


def cell_mode(module: nn.RNNCellBase) -> str:
    if isinstance(module, nn.LSTMCell):
        return "LSTM"
    if isinstance(module, nn.GRUCell):
        return "GRU"
    return "RNN_RELU" if getattr(module, "nonlinearity", "tanh") == "relu" else "RNN_TANH"


class CellHandler(RecurrentPart):
    """One side of nn.LSTMCell / nn.GRUCell / nn.RNNCell: r = dgi or dgh (G H), c = x or h, one position per
    call (a cell called in a loop over T steps sums T outer products, like a Linear called T times)."""

    rank_one_hint = True   # one call per example: stored as its two factors

    @classmethod
    def unsupported(cls, module, train_mode):
        return own_forward(module, (nn.LSTMCell, nn.GRUCell, nn.RNNCell, nn.RNNCellBase))

    @classmethod
    def parts(cls, module) -> list["CellHandler"]:
        step = CellStep(module)
        return [cls(module, step, "ih", True), cls(module, step, "hh", False)]

    def param_locals(self) -> tuple[str, str | None]:
        return f"weight_{self.key}", (f"bias_{self.key}" if self.has_bias else None)

    def rows(self, ctx, g):
        return g.unsqueeze(1)


for _cls in (nn.LSTMCell, nn.GRUCell, nn.RNNCell):
    register_handler(_cls, CellHandler)
