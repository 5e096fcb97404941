"""Named per-example losses for the common tasks, and their prediction forms.

Example:
    >>> TracIn(model, ckpts)                                  # loss_fn=None: "classification"
    >>> TracIn(lm, ckpts, loss_fn="causal_lm")                # GPT-style language model
    >>> TracIn(model, ckpts, loss_fn=F.mse_loss)              # any callable (output, target) -> value

Every loss sees ONE example: output f (1, ...) and target y (1, ...), and returns one value:
    classification        cross_entropy(f (1, C), y (1,) class index)
    regression            mean((f - y)^2) over the output's elements
    causal_lm             mean over the example's target tokens t = 1..T-1 of -log p(y_t | f_{t-1})
                          (tokens shifted by one; f (1, T, V); y the token ids, -100 = ignored)
    masked_lm             mean over positions with y_t != -100 of -log p(y_t | f_t)   (no shift)
    token_classification  same formula as masked_lm (labels per token, -100 ignored)
    seq2seq               as masked_lm over the decoder logits; the labels are also passed to the
                          model (labels=...) so that it builds its decoder inputs from them
Targets come from the batch: the labels (dict key 'labels' or the y of (x, y)); for causal_lm
without labels, the input_ids themselves. Positions where attention_mask is 0 are ignored
(-100) wherever the labels line up with the mask (causal_lm, masked_lm, token_classification), so
padding never counts and each sequence's mean is over its own real tokens.

Fisher samples (fisher_sample, for SOURCE's curvature="mc"): u (B, *out.shape[1:]) with E[u u^T] =
the Hessian of each example's loss in its output, H_out, drawn without forming H_out (O x O):
    cross-entropy over C classes   u = sqrt(w) (p - e_c),  c ~ p = softmax(f); w = sum of the target
                                   probabilities (1 for class indices)    (E = diag(p) - p p^T)
    token losses (mean over n)     u_t = (p_t - e_{c_t}) / sqrt(n) at each scored position, c_t ~ p_t,
                                   independent (blocks of H_out: (diag(p_t) - p_t p_t^T) / n); 0 elsewhere
    regression (mean over n)       u = sqrt(2 / n) eps,  eps ~ N(0, I)     (H_out = 2 I / n)
For these losses H_out is the Fisher of the model's predictive distribution, so J^T u is a sampled
Gauss-Newton factor: one backward pass per batch, whatever the number of outputs. A custom loss has
none (None): SOURCE then forms H_out by autograd.

Prediction form (target="prediction", a test example without labels), objective o with
proponents the examples whose training steps lowered o:
    classification / custom:  o = -f_c,  c the predicted class (argmax)
    regression:               o = -sum f (proponents raised the output)
    token losses:             o = -sum_t log p(y_t), the log-probability of the sequence's target
                              tokens: for causal_lm the tokens of the example itself (a prompt
                              and its generated continuation; label the prompt -100 to score
                              the continuation only), for masked_lm / token_classification the
                              predicted (argmax) token at each scored position, for seq2seq the
                              given labels (the generated output).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import TracInError

IGNORE = -100


class Loss:
    """A per-example loss with its prediction form. Subclasses override what differs."""

    name = "custom"
    model_labels = False   # pass the labels to the model as labels=... (seq2seq)

    def __init__(self, fn: Callable | None = None):
        self.fn = fn

    def __repr__(self) -> str:
        return f"Loss({self.name})"

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.fn(out, y)

    def prediction(self, out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Objective of target="prediction" for one example (see module docstring)."""
        return -out.reshape(out.shape[0], -1).gather(1, y.reshape(-1, 1).long()).sum()

    def targets(self, inputs: Any, y: torch.Tensor | None) -> torch.Tensor | None:
        """The loss targets of a batch from its inputs and labels (B, ...), or None (no labels)."""
        return y

    def predict(self, out: torch.Tensor, inputs: Any, y: torch.Tensor | None) -> torch.Tensor | None:
        """Targets of the prediction form for a batch output (B, ...): the predicted class (B,)."""
        return out.reshape(out.shape[0], -1).argmax(1)

    def fisher_sample(self, out: torch.Tensor, y: torch.Tensor | None,
                      generator: torch.Generator | None) -> torch.Tensor | None:
        """u (B, *out.shape[1:]) with E[u u^T] = each example's H_out (module docstring), or None: unknown."""
        return None

    def check(self, out: torch.Tensor, y: torch.Tensor | None) -> None:
        """Raise TracInError for labels that cannot fit the output (checked once per batch)."""
        if y is not None and out.dim() == 2 and not y.is_floating_point() and y.dim() == 1:
            bad = ((y < 0) | (y >= out.shape[1])).nonzero().flatten().tolist()
            if bad:
                raise TracInError(f"labels out of range for {out.shape[1]} classes at positions {bad[:10]} "
                                  f"(values {y[bad[:10]].tolist()}); labels must be class indices "
                                  f"0..{out.shape[1] - 1}.")

    def no_labels(self) -> str:
        return ("the data has no labels; pass (inputs, y), a dict with a 'labels' entry, or use "
                "target='prediction' for unlabeled data.")


class Classification(Loss):
    name = "classification"

    def __call__(self, out, y):
        if y.is_floating_point() and y.shape == out.shape:
            return F.cross_entropy(out, y)  # class probabilities
        return F.cross_entropy(out.reshape(out.shape[0], -1), y.reshape(-1).long())

    def fisher_sample(self, out, y, generator):
        if y is not None and y.is_floating_point() and y.shape == out.shape and out.dim() != 2:
            return None                     # probabilities over dim 1 of (B, C, ...): positions averaged
        flat = out.reshape(out.shape[0], -1)
        u = _categorical_residual(flat, generator)
        if y is not None and y.is_floating_point() and y.shape == out.shape:
            u = u * y.sum(1, keepdim=True).to(u.dtype).clamp_min(0).sqrt()
        return u.reshape(out.shape)


class Regression(Loss):
    name = "regression"

    def __call__(self, out, y):
        return (out.reshape(-1) - y.reshape(-1).to(out.dtype)).pow(2).mean()

    def prediction(self, out, y):
        return -out.sum()

    def predict(self, out, inputs, y):
        return None

    def fisher_sample(self, out, y, generator):
        n = out[0].numel()
        eps = torch.randn(out.shape, generator=generator, dtype=_sample_dtype(out)).to(out.device)
        return eps * (2.0 / n) ** 0.5

    def check(self, out, y):
        if y is not None and y.numel() != out.numel():
            raise TracInError(f"regression needs one target per output value: the output has shape "
                              f"{tuple(out.shape)}, the targets {tuple(y.shape)}.")


def token_nll(out: torch.Tensor, y: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p(y_t), number of scored tokens) for one example: out (1, T, V), y (1, T).

    shift=True scores y_t with the output at t-1 (causal LM). Tokens equal to -100 are skipped.
    Written with gather and a mask (no data-dependent indexing) so that torch.func.vmap can run it.
    """
    if shift:
        out, y = out[:, :-1], y[:, 1:]
    mask = y != IGNORE
    logp = torch.log_softmax(out, -1)
    ll = logp.gather(-1, y.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    return -(ll * mask).sum(), mask.sum()


class TokenLoss(Loss):
    """Per-token cross-entropy, averaged over the example's own scored tokens."""

    name = "masked_lm"
    shift = False
    labels_from_inputs = False
    mask_padding = True

    def __call__(self, out, y):
        total, count = token_nll(out, y, self.shift)
        return total / count.clamp_min(1)

    def prediction(self, out, y):
        return token_nll(out, y, self.shift)[0]

    def fisher_sample(self, out, y, generator):
        if y is None or out.dim() != 3 or y.shape != out.shape[:2]:
            return None
        logits, tgt = (out[:, :-1], y[:, 1:]) if self.shift else (out, y)
        scored = (tgt != IGNORE).to(_sample_dtype(out))
        weight = scored / scored.sum(1, keepdim=True).clamp_min(1).sqrt()      # 1 / sqrt(n) where scored
        u = torch.zeros(out.shape, dtype=weight.dtype, device=out.device)
        u[:, :logits.shape[1]] = _categorical_residual(logits, generator) * weight.unsqueeze(-1)
        return u

    def targets(self, inputs, y):
        if y is None and self.labels_from_inputs:
            y = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
            if not torch.is_tensor(y) or y.is_floating_point():
                return None
        if y is None:
            return None
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if self.mask_padding and torch.is_tensor(mask) and mask.shape == y.shape:
            y = y.masked_fill(mask == 0, IGNORE)
        return y

    def predict(self, out, inputs, y):
        y = self.targets(inputs, y)
        if self.labels_from_inputs:
            return y
        pred = out.argmax(-1)
        if y is not None:
            return pred.masked_fill(y == IGNORE, IGNORE)
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        return pred if mask is None or mask.shape != pred.shape else pred.masked_fill(mask == 0, IGNORE)

    def check(self, out, y):
        if y is None:
            return
        T = y.shape[1] if y.dim() == 2 else None
        if out.dim() != 3 or T is None or out.shape[:2] != y.shape:
            raise TracInError(f"loss_fn='{self.name}' needs logits (B, T, vocab) and token labels (B, T); "
                              f"the model output has shape {tuple(out.shape)} and the labels "
                              f"{tuple(y.shape)}. Pass output_fn=... if the logits sit elsewhere.")
        bad = ((y != IGNORE) & ((y < 0) | (y >= out.shape[-1]))).nonzero()
        if len(bad):
            raise TracInError(f"token labels out of range for {out.shape[-1]} classes at (example, position) "
                              f"{bad[:5].tolist()}; use 0..{out.shape[-1] - 1}, or -100 to ignore a position.")

    def no_labels(self):
        return (f"loss_fn='{self.name}' needs token labels (B, T) with -100 where nothing is scored; "
                "pass them under 'labels' in the batch dict or as y in (inputs, y).")


class CausalLM(TokenLoss):
    name, shift, labels_from_inputs = "causal_lm", True, True

    def no_labels(self):
        return ("loss_fn='causal_lm' found no token ids: pass the tokens as 'input_ids' in the batch dict "
                "(they are their own targets), or labels under 'labels'.")


class MaskedLM(TokenLoss):
    name = "masked_lm"


class TokenClassification(TokenLoss):
    name = "token_classification"


class Seq2Seq(TokenLoss):
    name, model_labels, mask_padding = "seq2seq", True, False

    def predict(self, out, inputs, y):
        return y

    def no_labels(self):
        return ("loss_fn='seq2seq' needs the target sequence as 'labels' (B, T_out), -100 at padding; for "
                "target='prediction' pass the generated output tokens as labels.")


def _sample_dtype(out: torch.Tensor) -> torch.dtype:
    """float64 for float64 outputs, else float32 (half-precision logits are sampled in float32)."""
    return torch.float64 if out.dtype == torch.float64 else torch.float32


_CDF_NUMBERS = 2**24   # float64 CDF entries formed at once when sampling (128 MiB): rows are drawn in chunks


def _categorical_residual(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """p - e_c over the last dimension (..., C): p = softmax(logits), c ~ p drawn by inverting the CDF with
    uniforms from `generator` (made on the CPU, so one seed gives the same draws on any device); the
    float64 CDF is formed for a chunk of rows at a time (a language model's T x V logits)."""
    u = torch.softmax(logits.detach().to(_sample_dtype(logits)), -1)
    flat = u.view(-1, u.shape[-1])
    r = torch.rand(flat.shape[0], generator=generator, dtype=torch.float64).to(u.device)
    step = max(1, _CDF_NUMBERS // flat.shape[1])
    for s in range(0, flat.shape[0], step):
        cdf = flat[s:s + step].double().cumsum(-1)
        c = torch.searchsorted(cdf, (r[s:s + step] * cdf[:, -1]).unsqueeze(-1), right=True)
        flat[s:s + step].scatter_add_(-1, c.clamp_max(flat.shape[1] - 1),
                                      torch.full(c.shape, -1.0, dtype=flat.dtype, device=flat.device))
    return u


LOSSES: dict[str, type[Loss]] = {c.name: c for c in (Classification, Regression, CausalLM, MaskedLM,
                                                     TokenClassification, Seq2Seq)}


def resolve_loss(loss_fn: str | Callable | Loss | None) -> Loss:
    """None -> classification; a name from LOSSES; a Loss; or any callable (output, target) -> value."""
    if loss_fn is None:
        return Classification()
    if isinstance(loss_fn, Loss):
        return loss_fn
    if isinstance(loss_fn, str):
        if loss_fn not in LOSSES:
            raise TracInError(f"unknown loss_fn {loss_fn!r}; use one of {sorted(LOSSES)} or a function "
                              "(output, target) -> loss of one example.")
        return LOSSES[loss_fn]()
    if callable(loss_fn):
        return Loss(loss_fn)
    raise TracInError(f"loss_fn must be a name ({sorted(LOSSES)}), a function or None; got {type(loss_fn).__name__}.")
