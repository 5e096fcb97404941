"""The output side of EK-FAC: pseudo-gradients u of the loss in the model's outputs, with sum_k u_k u_k^T
the output Hessian H_out (exactly, or on average), from which each layer's output gradients follow.

Example:
    >>> resolve_curvature("auto", lambda: 10)                 # "gn": few outputs, the exact factor
    >>> U = output_factors(loss, out, y, "mc", generator)     # (B, 1, O): one sampled label per position

curvature="gn": the columns of a factor of H_out (formed by autograd, O x O per example: one backward
pass per output); "mc": for the named losses one label per position drawn from the model's own
prediction (Loss.fisher_sample, unbiased, any number of outputs), for a custom loss H_out^(1/2) eps;
"empirical": the gradient at the true labels. "auto" is "gn" up to GN_OUTPUTS outputs per example, else
"mc". A Hessian that cannot fit in memory is refused before it is formed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.func import grad, hessian, vmap

from ..errors import TracInError
from ..losses import Loss
from ..memory import budget, rows_that_fit

CURVATURES = ("auto", "gn", "mc", "empirical")
GN_OUTPUTS = 32   # curvature="auto": the exact output Hessian (one backward pass per output) up to this many outputs


def resolve_curvature(curvature: str, outputs: Callable[[], int]) -> str:
    """`curvature` itself, or for "auto" "gn" when the model has at most GN_OUTPUTS outputs per example
    (`outputs()` counts them: exact, one backward pass per output), else "mc" (one sampled label per
    position)."""
    if curvature not in CURVATURES:
        raise TracInError(f"curvature must be one of {CURVATURES}, got {curvature!r}.")
    if curvature != "auto":
        return curvature
    return "gn" if outputs() <= GN_OUTPUTS else "mc"


def output_factors(loss_fn: Loss, out: torch.Tensor, y: torch.Tensor | None, curvature: str,
                   generator: torch.Generator | None) -> torch.Tensor:
    """U (B, K, O) with sum_k u_k u_k^T = H_out ("gn"), a sample of it ("mc"), or grad l ("empirical"), for
    the model's outputs `out` (B, ...) and the loss targets y."""
    shape = out.shape[1:]

    def one(o, t):
        return loss_fn(o.reshape(shape).unsqueeze(0), t.unsqueeze(0)).reshape(())

    flat = out.reshape(out.shape[0], -1)
    if curvature == "mc":
        u = loss_fn.fisher_sample(out, y, generator)
        if u is not None:
            return u.reshape(flat.shape).unsqueeze(1)
    if y is not None and y.is_floating_point():
        y = y.to(torch.float64 if curvature != "empirical" else flat.dtype)
    if curvature == "empirical":
        return vmap(grad(lambda o, t: one(o, t)))(flat, y).unsqueeze(1)
    O = flat.shape[1]
    per_example = 4 * 8 * O * O                          # H, its symmetric part, eigenvectors, L (float64)
    if per_example > budget(out.device):
        raise TracInError(
            f"curvature={curvature!r} with loss_fn={loss_fn.name!r} forms the Hessian of the loss in the model's "
            f"{O} outputs per example ({per_example / 2**30:.1f} GiB for one example; "
            f"{budget(out.device) / 2**30:.1f} GiB can be used). " + (
                "Use curvature='mc' (or 'auto'), which samples one label per position instead."
                if loss_fn.name != "custom" else
                "Pass a named loss_fn ('classification', 'causal_lm', 'masked_lm', 'token_classification', "
                "'seq2seq', 'regression') with curvature='mc', which samples labels instead, or use "
                "curvature='empirical' (the true labels' gradients)."))
    rows = rows_that_fit(per_example, out.device, maximum=flat.shape[0])
    parts = []
    for s in range(0, flat.shape[0], rows):
        H = vmap(hessian(lambda o, t: one(o, t)))(flat[s:s + rows].double(), None if y is None else y[s:s + rows])
        ev, V = torch.linalg.eigh((H + H.transpose(1, 2)) / 2)                  # (b, O, O)
        parts.append(V * ev.clamp_min(0).sqrt().unsqueeze(1))                   # H = L L^T
    L = torch.cat(parts)
    if curvature == "gn":
        return L.transpose(1, 2)
    eps = torch.randn(flat.shape[0], flat.shape[1], 1, dtype=L.dtype, generator=generator)
    return (L @ eps.to(L.device)).transpose(1, 2)
