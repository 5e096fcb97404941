"""EK-FAC's pseudo-gradients of the parameters no layer handler covers (a ViT's cls_token and pos_embed).

Example:
    >>> gen = GenericPseudoGradients(gc, ["cls_token", "pos_embed"])
    >>> copies = gen.copies(state, params, x, y)                      # put them in the capture's forward
    >>> G = gen.from_copies([grads_k for each k], copies)             # (B, K, n), or None: use reference()
    >>> G = gen.reference(state, x, y, U)                             # (B, K, n): vmap, else a loop

SOURCE's curvature takes such parameters as one vector block (curvature_blocks.LayerPlan, generic=True):
a column of n numbers per example, its factor S the second moment of the pseudo-gradients
g_bk = J_b^T u_bk (J_b the Jacobian of example b's output with respect to them, u_bk the output
curvature's columns: output_curvature.py), exact (n x n) up to VECTOR_DENSE numbers, else its
diagonal. Where the model broadcasts them over the batch (gradients/broadcast.py) the capture's own
backward gives g_bk through per-example copies; that is checked once, on the first batch, against
the per-example reference (torch.func vmap of the objective <f_b, u_bk>, else a loop over the examples),
which is used from then on when it disagrees.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from .. import inputs as tree
from ..gradients.broadcast import agrees, broadcast_copy, find_lead
from ..gradients.per_example import GradientComputer, VmapFailed, model_mode
from ..losses import Loss


class GenericPseudoGradients:
    """Per-example pseudo-gradients (B, K, n) of parameters `names` (n numbers in all, in that order)."""

    def __init__(self, grads: GradientComputer, names: Sequence[str]):
        self.grads = grads
        self.names = list(names)
        self.lead: int | None = None
        self.broadcast: bool | None = None     # copies give the per-example gradients (None: not yet checked)
        self.vmap = not grads.loss_fn.model_labels   # reference() by torch.func (False: it failed, or seq2seq)

    def copies(self, state: dict, x: Any, y: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-example copies (B, ...) of the parameters, requiring grad, to substitute in a batched forward;
        {} where they are known not to act per example. x, y: the batch as gc.batch returns it."""
        if self.broadcast is False:
            return {}
        if self.lead is None:
            self.lead = find_lead(self.grads, self.names, state, x, y, "loss")
            if self.lead is None:
                self.broadcast = False
                return {}
        B = tree.length(x)
        return {n: broadcast_copy(state[n].detach(), B, self.lead).requires_grad_(True) for n in self.names}

    def from_copies(self, grads: Sequence[Sequence[torch.Tensor | None]],
                    copies: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K, n) from the gradients with respect to the copies, per k in the order of `copies`."""
        B = next(iter(copies.values())).shape[0]
        per_k = [torch.cat([(torch.zeros_like(c) if g is None else g).reshape(B, -1)
                            for c, g in zip(copies.values(), gk)], 1) for gk in grads]
        return torch.stack(per_k, 1)

    def settle(self, got: torch.Tensor, ref: torch.Tensor) -> bool:
        """Record whether the copies' pseudo-gradients equal the loop's (the first batch); returns it."""
        self.broadcast = agrees(got, ref)
        return self.broadcast

    def reference(self, state: dict, x: Any, y: torch.Tensor | None, U: torch.Tensor) -> torch.Tensor:
        """(B, K, n) float: g_bk = J_b^T u_bk, the gradient of <f_b, u_bk> (f_b example b's output) in the
        parameters. U (B, K, O): the output curvature's columns, O the numbers of one example's output. By
        torch.func vmap over the examples (K passes), else (a model vmap cannot run, a seq2seq model whose
        forward takes the labels) one example at a time."""
        if self.vmap:
            pseudo = copy.copy(self.grads)                 # the same model and state; objective <f_b, u_b>
            pseudo.loss_fn = Loss(_inner)
            try:
                return torch.stack([pseudo.per_example(state, x, U[:, k], "loss", self.names)
                                    for k in range(U.shape[1])], 1)
            except VmapFailed:
                self.vmap = False
        return self.loop(state, x, y, U)

    def loop(self, state: dict, x: Any, y: torch.Tensor | None, U: torch.Tensor) -> torch.Tensor:
        """reference() one example at a time: a forward each, K backward passes."""
        gc = self.grads
        B, K = U.shape[:2]
        rows = []
        with model_mode(gc.model, gc.train_mode), torch.enable_grad():
            for b in range(B):
                params = {k: (v.detach().requires_grad_(True) if k in self.names else v) for k, v in state.items()}
                yb = None if y is None else y[b:b + 1]
                out = gc.forward(params, tree.take(x, b, b + 1), yb)
                wrt = [params[n] for n in self.names]
                if not out.requires_grad:                  # the output does not depend on them
                    rows.append(torch.zeros(K, sum(p.numel() for p in wrt), dtype=out.dtype, device=out.device))
                    continue
                per_k = []
                for k in range(K):
                    g = torch.autograd.grad(out, wrt, grad_outputs=U[b:b + 1, k].reshape(out.shape).to(out.dtype),
                                            retain_graph=k + 1 < K, allow_unused=True)
                    per_k.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                                            for p, gi in zip(wrt, g)]))
                rows.append(torch.stack(per_k))
        return torch.stack(rows)


def _inner(out: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """<f, u>: the objective whose gradient in the parameters is J^T u (one example's output f)."""
    return (out * u.reshape(out.shape).to(out.dtype)).sum()
