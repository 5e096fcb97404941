"""TracInIdeal: the exact test-loss change of every training step, attributed to the step's examples.

Example:
    >>> rec = TracInIdealRecorder(model, F.cross_entropy, (X_test, y_test), n_train=len(X_train))
    >>> for idx in batches:                                   # idx: LongTensor of training indices
    ...     opt.zero_grad(); F.cross_entropy(model(X[idx]), y[idx]).backward()
    ...     with rec.step(idx, X[idx], y[idx], lr=opt.param_groups[0]["lr"]):
    ...         opt.step()
    >>> rec.ideal           # Tensor (n_test, n_train) float64: TracInIdeal(z, z'), positive = proponent
    >>> rec.first_order     # same shape: sum over steps of the first-order terms a_t(z, z') below

For step t with batch B_t (size B), weights w_t before and w_{t+1} after the optimizer step, and
test example z'_j, the recorder measures the exact change
    D_t(z'_j) = l(w_t, z'_j) - l(w_{t+1}, z'_j)
and the first-order term of each batch example, assuming the step w_{t+1} - w_t = -lr/B sum_b g_b
(plain SGD on the mean loss; reduction="sum" drops the 1/B):
    a_t(z_b, z'_j) = lr / B <grad l(w_t, z'_j), grad l(w_t, z_b)>.
The change is split over the batch so the shares add up to D_t exactly:
    split="residual" (default):  share(z_b) = a_t(z_b) + (D_t - sum_b a_t(z_b)) / B
        (first-order attribution, the higher-order remainder shared equally; stable when the
        first-order terms cancel);
    split="proportional":        share(z_b) = D_t a_t(z_b) / sum_b a_t(z_b)
        (the TracIn paper's partition; when |sum_b a_t| < 1e-12 sum_b |a_t| it falls back to
        "residual" for that test example and step).
TracInIdeal(z, z'_j) = sum over steps t with z in B_t of share_t(z).  With B = 1 and a small lr,
share = D_t = a_t + O(lr^2), so TracInIdeal approaches TracIn = sum_t lr <g(z'), g(z_t)>.
Gradients and losses are taken with the model in eval mode (no dropout), then the mode is restored.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch.func import functional_call, grad, vmap

from ..errors import TracInError


class TracInIdealRecorder:
    """Accumulates TracInIdeal for fixed test examples while you train. See the module docstring."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, test_data: tuple[torch.Tensor, torch.Tensor],
                 n_train: int, split: str = "residual", reduction: str = "mean"):
        if split not in ("residual", "proportional"):
            raise TracInError(f"split must be 'residual' or 'proportional', got {split!r}.")
        if reduction not in ("mean", "sum"):
            raise TracInError(f"reduction must be 'mean' or 'sum' (how the training loss reduces the batch), got {reduction!r}.")
        if not (isinstance(test_data, (tuple, list)) and len(test_data) == 2):
            raise TracInError("test_data must be a tuple (X_test, y_test) of tensors.")
        self.model, self.loss_fn, self.split, self.reduction = model, loss_fn, split, reduction
        self.x_test, self.y_test = test_data
        self.n_train = int(n_train)
        m = len(self.x_test)
        self.ideal = torch.zeros(m, self.n_train, dtype=torch.float64)
        self.first_order = torch.zeros(m, self.n_train, dtype=torch.float64)
        self.steps = 0
        self._pending: tuple | None = None

    # -- per-example quantities at the current weights ------------------------------------------
    def _params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def _loss_one(self, params, buffers, x, y):
        out = functional_call(self.model, {**params, **buffers}, (x.unsqueeze(0),))
        return self.loss_fn(out, y.unsqueeze(0))

    def _grads(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        params = self._params()
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        g = vmap(grad(self._loss_one), in_dims=(None, None, 0, 0))(params, buffers, x, y)
        return torch.cat([g[n].reshape(x.shape[0], -1) for n in params], 1).double()

    def _test_losses(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(self.x_test)
            return torch.stack([self.loss_fn(out[j:j + 1], self.y_test[j:j + 1]) for j in range(len(out))]).double()

    @contextmanager
    def _eval(self) -> Iterator[None]:
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    # -- the hook --------------------------------------------------------------------------------
    def before_step(self, batch_indices: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """Call with the step's batch just before optimizer.step() (the weights are still w_t)."""
        if self._pending is not None:
            raise TracInError("before_step was called twice; call after_step() after optimizer.step().")
        idx = torch.as_tensor(batch_indices, dtype=torch.int64).flatten()
        if len(idx) != len(x) or len(idx) == 0:
            raise TracInError(f"batch_indices has {len(idx)} entries for a batch of {len(x)} examples.")
        if int(idx.min()) < 0 or int(idx.max()) >= self.n_train:
            raise TracInError(f"batch_indices must lie in [0, n_train={self.n_train}).")
        with self._eval():
            g_batch = self._grads(x, y)
            g_test = self._grads(self.x_test, self.y_test)
            before = self._test_losses()
        scale = float(lr) / (len(idx) if self.reduction == "mean" else 1)
        self._pending = (idx, scale * (g_test @ g_batch.T), before)  # a: (m, B)

    def after_step(self) -> None:
        """Call right after optimizer.step(): measures D_t and adds each example's share."""
        if self._pending is None:
            raise TracInError("after_step was called without before_step.")
        idx, a, before = self._pending
        self._pending = None
        with self._eval():
            delta = before - self._test_losses()  # (m,)
        B = a.shape[1]
        total = a.sum(1)
        share = a + ((delta - total) / B).unsqueeze(1)
        if self.split == "proportional":
            ok = total.abs() >= 1e-12 * a.abs().sum(1)
            prop = delta.unsqueeze(1) * a / torch.where(ok, total, torch.ones_like(total)).unsqueeze(1)
            share = torch.where(ok.unsqueeze(1), prop, share)
        self.ideal.index_add_(1, idx, share)
        self.first_order.index_add_(1, idx, a)
        self.steps += 1

    @contextmanager
    def step(self, batch_indices: torch.Tensor, x: torch.Tensor, y: torch.Tensor, lr: float) -> Iterator[None]:
        """with rec.step(idx, x, y, lr): optimizer.step()  -- before_step / after_step around the block."""
        self.before_step(batch_indices, x, y, lr)
        try:
            yield
        except BaseException:
            self._pending = None
            raise
        self.after_step()
