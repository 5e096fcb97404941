"""What a layer handler is: the per-layer knowledge behind exact, factored and EK-FAC features.

A handler wraps one module and knows, from what a forward hook saw (`capture`) and the gradient
g of the module's output (from one batched backward of sum_b l_b), the per-example gradient of the
module's own parameters. Two families:

KronHandler: the weight gradient of example b is a sum of outer products over positions t,
    dW_b = sum_t r_bt c_bt^T        W viewed as a (R, C) matrix ("rows", "cols"),
(Linear: r = g_t, c = a_t; Conv: t = output positions, c = unfolded patches; Embedding: r = the
one-hot of token t, c = g_t). A bias is the weight of a constant column 1 appended to c, so the
bias gradient is sum_t r_bt. This gives, without forming a per-example gradient per token,
    exact:     dW_b = R_b^T C_b  (one bmm),  or (c_b, r_b) when T = 1 (rank one, stored as factors)
    factored:  P_r^T dW_b P_c = sum_t (P_r^T r_bt)(P_c^T c_bt)^T       (k_r, k_c)
    EK-FAC:    A = E[c c^T], S = E[r r^T] (when `kronecker` is True).
VectorHandler: small parameters (norm scales and shifts) whose per-example gradient (B, n) is
computed directly, exactly.

Shapes: B examples, T positions, R rows, C cols (without the bias column).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ...errors import TracInError


class Unsupported(TracInError):
    """The model (or a layer's input) does not fit the hook path; use vmap instead."""


class GenericLayers(Unsupported):
    """Layers the hook path cannot split by example while the generic path can (the featurizer rebuilds the
    hook path with these modules generic): a weight also used outside its layer's forward (DeBERTa reads its
    relative-position table directly), or SharedInput."""

    def __init__(self, message: str, modules: list[str]):
        super().__init__(message)
        self.modules = modules


class SharedInput(GenericLayers):
    """Layers whose input does not hold the batch (computed from something all examples share: T5's relative
    position buckets (T, T)), or whose output shared by the batch the model cannot take per example."""


class LayerHandler:
    """Base of all handlers. One instance per module; `covers` are the local parameter names handled."""

    kind = "base"
    covers: tuple[str, ...] = ("weight", "bias")

    def __init__(self, module: nn.Module):
        self.module = module
        self.kwargs: dict = {}   # the keyword arguments of the module's latest call in the hook pass
        self.computes_in: torch.dtype | None = None   # float32 where a float64 model's layer computes in it

    @classmethod
    def unsupported(cls, module: nn.Module, train_mode: bool) -> str | None:
        """Why this module cannot be handled (then its parameters take the generic path), or None."""
        return None

    @classmethod
    def covered(cls, module: nn.Module) -> set[str]:
        """The module's local parameter names this handler class covers (default: `covers`)."""
        return set(cls.covers)

    @classmethod
    def parts(cls, module: nn.Module) -> list["LayerHandler"]:
        """The handler instances of one module: one, or one per weight (an RNN's per layer and side)."""
        return [cls(module)]

    def capture(self, inputs: tuple, output: torch.Tensor) -> Any:
        """What the forward hook keeps (detached): by default the first input."""
        return inputs[0].detach()

    def record(self, inputs: tuple, output: Any) -> tuple[Any, torch.Tensor]:
        """What the hook path's forward hook takes from one call: (ctx, probe), the probe being the
        tensor whose gradient the handler's formulas read (by default the module's output)."""
        return self.capture(inputs, output), output

    def attach(self, hook: Callable) -> Any:
        """Install the hook path's forward hook(module, inputs, output) on the module for one pass (keeping
        the call's keyword arguments in `kwargs`); returns a handle whose remove() undoes it (a handler may
        also change how the module computes, rnn.py)."""
        def with_kwargs(m, args, kwargs, output):
            self.kwargs = kwargs
            return hook(m, args, output)
        return self.module.register_forward_hook(with_kwargs, with_kwargs=True)

    @staticmethod
    def batch_of(ctx: Any) -> int:
        return ctx.shape[0]

    def done(self) -> None:
        """Called when a pass has taken what it needs from this handler's calls: drop anything kept across
        them (experts.py caches the experts' recomputation shared by its two parts)."""


class KronHandler(LayerHandler):
    """dW_b = sum_t r_bt c_bt^T (+ bias column). Subclasses give `shape`, `rows`, `cols`; they may
    override the projected and exact forms with cheaper ones (a convolution, a row lookup)."""

    kind = "kron"
    kronecker = True   # EK-FAC factors A = E[c c^T], S = E[r r^T] are meaningful
    one_hot_rows = False   # rows are one-hot ids (Embedding): EK-FAC's factor on that side is a diagonal
    sparse_grad = False  # grad_into adds to few entries (Embedding): a tied block writes its dense uses first

    def shape(self) -> tuple[int, int]:
        """(R, C) of the weight viewed as a matrix (bias excluded)."""
        raise NotImplementedError

    def param_locals(self) -> tuple[str, str | None]:
        """The module's local names of this block's weight and bias (None without one)."""
        return "weight", ("bias" if self.has_bias else None)

    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    def rows(self, ctx: Any, g: torch.Tensor) -> torch.Tensor:
        """(B, T, R) row-side vectors."""
        raise NotImplementedError

    def cols(self, ctx: Any, g: torch.Tensor) -> torch.Tensor:
        """(B, T, C) column-side vectors (without the bias column)."""
        raise NotImplementedError

    def positions(self, ctx: Any, g: torch.Tensor) -> int:
        """T: how many outer products make up one example's gradient."""
        return self.rows(ctx, g).shape[1]

    def fixed_positions(self, ctx: Any) -> bool:
        """Whether T is set by the model rather than by each batch (an image's grid, not a padded sequence's
        length): exact rows may then store the T factor pairs instead of the R x C matrix (hooks._settle)."""
        return False

    def proj_rows(self, ctx: Any, g: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """(B, T, k_r) = rows @ P_r."""
        return self.rows(ctx, g) @ P

    def proj_cols(self, ctx: Any, g: torch.Tensor, P: torch.Tensor, p_bias: torch.Tensor | None) -> torch.Tensor:
        """(B, T, k_c) = [cols, 1] @ P_c, P (C, k_c) the weight part, p_bias (k_c,) the bias row."""
        z = self.cols(ctx, g) @ P
        return z if p_bias is None else z + p_bias

    def grad_matrix(self, ctx: Any, g: torch.Tensor) -> torch.Tensor:
        """(B, R, C) exact per-example weight gradients."""
        return torch.bmm(self.rows(ctx, g).transpose(1, 2), self.cols(ctx, g))

    def grad_into(self, ctx: Any, g: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
        """Write (or, with accumulate, add) the exact per-example weight gradients into `out` (B, numel),
        in the parameter's flat order (to_params); `out` is a view of the feature rows, holding arbitrary
        numbers (a reused buffer) unless accumulating: every entry must be written.

        Default: to_params(grad_matrix) copied in; when neither is overridden, one bmm straight into
        `out` viewed as (B, R, C) (no (B, R, C) temporary and no copy). Subclasses overriding
        grad_matrix or to_params may override this too with a copy-free form (conv.py, embedding.py).
        """
        if type(self).grad_matrix is KronHandler.grad_matrix and type(self).to_params is KronHandler.to_params:
            bmm_into(out.unflatten(1, self.shape()), self.rows(ctx, g).transpose(1, 2), self.cols(ctx, g),
                     accumulate)
            return
        W = self.to_params(self.grad_matrix(ctx, g))
        out.add_(W) if accumulate else out.copy_(W)

    def bias_grad(self, ctx: Any, g: torch.Tensor) -> torch.Tensor:
        """(B, R) exact per-example bias gradients: sum_t r_bt."""
        return self.rows(ctx, g).sum(1)

    def to_params(self, W: torch.Tensor) -> torch.Tensor:
        """(B, R, C) -> (B, numel) in the weight parameter's own (flattened) order."""
        return W.flatten(1)

    def from_params(self, flat: torch.Tensor) -> torch.Tensor:
        """Inverse of to_params: (B, numel) -> (B, R, C)."""
        R, C = self.shape()
        return flat.reshape(flat.shape[0], R, C)


def bmm_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, accumulate: bool) -> None:
    """out (B, m, n) = x @ y (or += with accumulate), x (B, m, k), y (B, k, n); `out` may be a strided view."""
    if x.dtype != out.dtype or y.dtype != out.dtype:      # layers of mixed precision: through a product
        p = torch.bmm(x, y)
        out.add_(p) if accumulate else out.copy_(p)
    elif accumulate:
        out.baddbmm_(x, y)
    else:
        torch.bmm(x, y, out=out)


class VectorHandler(LayerHandler):
    """Small parameters whose per-example gradients are computed exactly: `vector` gives (B, n)."""

    kind = "vector"

    def size(self) -> int:
        return sum(getattr(self.module, n).numel() for n in self.present())

    def present(self) -> list[str]:
        """Local names of the covered parameters this module has, in registration order."""
        own = dict(self.module.named_parameters(recurse=False))
        return [n for n in own if n in self.covers]

    def vector(self, ctx: Any, g: torch.Tensor) -> torch.Tensor:
        """(B, n) per-example gradients of the present parameters, each flattened, in order."""
        raise NotImplementedError
