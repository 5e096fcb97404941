"""Per-example copies of parameters that a model broadcasts over the batch (a ViT's cls_token, pos_embed).

Example:
    >>> lead = find_lead(gc, ["cls_token", "pos_embed"], state, x, y, "loss")     # 0 (leading size 1)
    >>> copies = {n: broadcast_copy(state[n], B, lead).requires_grad_(True) for n in names}
    >>> out = gc.forward({**state, **copies}, x, y)     # copies[n].grad[b]: example b's own gradient

A parameter p of leading size 1 ((1, 1, D), (1, N, D)) is usually added to or concatenated with each
example's activations by broadcasting: a copy (B, ...) of it, substituted in a batched forward pass,
gives copy b to example b only, so the gradient of the summed objectives with respect to the copy is the
stack of the per-example gradients, at the cost of one batched backward. So does a 1-D parameter used
as an elementwise scale or shift (ConvNeXt's layer scale on (B, H, W, C)) as a copy (B, 1, .., 1, C)
with `lead` ones, found by find_lead. Callers check the result against a per-example reference (vmap or
a loop) once before relying on it: a model may use the parameter in a way the copies do not reproduce.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import inputs as tree
from .per_example import GradientComputer, Target, model_mode


def broadcast_copy(p: torch.Tensor, B: int, lead: int) -> torch.Tensor:
    """A per-example copy of parameter p: (B, ...) for a leading size 1, else (B, 1 x lead, *p.shape)."""
    view = p if p.shape[:1] == (1,) else p.reshape((1,) * (1 + lead) + tuple(p.shape))
    return view.expand(B, *view.shape[1:]).clone()


def find_lead(gc: GradientComputer, names: Sequence[str], state: dict, x: Any, y: torch.Tensor | None,
              target: Target) -> int | None:
    """How many ones between the batch and a 1-D parameter make per-example copies that act per example
    (0 without 1-D ones); None when no count up to 3 does. Tested with copies that differ by example (the
    parameters + 0.5 + 0.1 b: a layer scale starts near 1e-6, and equal copies broadcast wrongly would go
    unseen): the batched objectives of the first and last examples must equal their own forward passes
    with those values. x, y: a batch as gc.batch returns it."""
    if all(gc.shapes[n][:1] == (1,) for n in names):
        return 0
    B = tree.length(x)
    varied = {n: state[n] + 0.5 for n in names}
    step = torch.arange(B, device=gc.device)
    with torch.no_grad(), model_mode(gc.model, gc.train_mode):
        alone = {}
        for b in sorted({0, B - 1}):
            yb = None if y is None else y[b:b + 1]
            alone[b] = gc.objectives(gc.forward({**state, **{n: varied[n] + 0.1 * b for n in names}},
                                                tree.take(x, b, b + 1), yb), yb, target)
        for lead in range(4):
            copies = {}
            for n in names:
                c = broadcast_copy(varied[n], B, lead)
                copies[n] = c + 0.1 * step.reshape(B, *(1,) * (c.dim() - 1)).to(c.dtype)
            try:
                got = gc.objectives(gc.forward({**state, **copies}, x, y), y, target)
            except Exception:
                continue
            if all(bool(torch.isfinite(a).all()) and got[b:b + 1].shape == a.shape
                   and bool(torch.allclose(got[b:b + 1], a, rtol=1e-4, atol=1e-6)) for b, a in alone.items()):
                return lead
    return None


def agrees(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether per-example gradients from copies equal the reference's, to the dtype's rounding
    (relative to the largest entry: 1e-9 in float64, 1e-4 otherwise)."""
    tol = 1e-9 if ref.dtype == torch.float64 else 1e-4
    return got.shape == ref.shape and bool(torch.allclose(got, ref, rtol=tol,
                                                          atol=tol * float(ref.abs().max()) + 1e-30))
