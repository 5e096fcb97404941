"""Outliers by self-influence, with a per-checkpoint breakdown, and ReTrac-style renormalized influence.

Example:
    >>> out = rank_outliers(index)                          # default: space="output", normalize="none"
    >>> out.indices[:20]                                    # 20 most self-influential training examples
    >>> out.per_checkpoint[:, out.indices[0]]               # which checkpoints made it stand out
    >>> rank_outliers(index, space="parameters")            # the paper's sum_c eta_c ||g_c(z)||^2
    >>> rank_outliers(index, checkpoints=[0, 1])            # early checkpoints only
    >>> renormalized_top_k(index, (X_test, y_test), k=10)   # proponents not dominated by huge gradients

Two spaces for the self-influence of z at checkpoint c, q_c(z):
    space="parameters":  q_c(z) = ||g_c(z)||^2, g_c = grad_w l(w_c, z) over the index's layers (the TracIn
                         paper's self-influence; index.self_influence())
    space="output":      q_c(z) = ||dl(f_c(z), y)/df_c(z)||^2, f_c(z) the model output (logits) at
                         checkpoint c; recorded during featurization (the hook paths take it
                         from their own backward pass; vmap/loop do one extra forward). It is the
                         self-influence of an output-layer bias (dl/db = dl/df), and for cross-entropy
                         ||p - onehot(y)||^2. (default)
Since g_c = J_c(z)^T dl/df with J_c the output Jacobian, the parameter version equals
(dl/df)^T J_c J_c^T (dl/df): the output version times how strongly the parameters move z's own
output (the per-example tangent kernel). That kernel factor varies a lot between examples and
grows while a network memorizes, so in the parameter space checkpoints in the middle of
memorization (huge gradients of the examples being memorized right now, flipped or not) dominate the
sum. In the output space every checkpoint votes with "how badly does the model fit z here". On the
digits mislabel benchmark (docs/benchmarks.md, 3 seeds) it finds more flipped labels in the top 10%
than the parameter version, the final loss and cleanlab when the model memorizes (0.89 vs 0.76, 0.52,
0.87) and ties the final loss when training stops early; like any self-influence it needs
checkpoints saved before the wrong labels are memorized.

Terms, with checkpoint weights w_c (default eta_c; `weights=` replaces them, `checkpoints=` zeroes
the others):
    normalize="none":        t_c(z) = w_c q_c(z)                      (default; s = sum_c t_c)
    normalize="checkpoint":  t_c(z) = w_c q_c(z) / mean_z' q_c(z')    (each checkpoint on one scale)
    normalize="log":         t_c(z) = w_c / sum w * log(q_c(z) / mean_z' q_c(z'))  (weighted geometric mean)
and score s(z) = sum_c t_c(z); higher = more unusual.

Renormalized influence (Diffusion-ReTrac, Xie et al. 2024): the training gradient is divided by its
norm, so examples with large gradients (mislabelled, atypical) stop topping every proponent list:
    R(z, z') = sum_c eta_c <g_c(z'), g_c(z)> / |g_c(z)|.
(Normalizing the test gradient too gives index.similarity, the lr-weighted mean cosine.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..data import BatchFn
from ..errors import TracInError
from ..gradients.per_example import Target
from ..store.scoring import accum_dtype, score_blocks
from ..store.topk import TopK, streaming_top_k


NORMALIZE = ("none", "checkpoint", "log")
SPACES = ("output", "parameters")


@dataclass(frozen=True)
class Outliers:
    """indices (n_train,) int64: training examples, highest score first; scores (n_train,) float64
    by training index; per_checkpoint (C, n_train) float64 terms t_c(z) that sum to scores."""

    indices: torch.Tensor
    scores: torch.Tensor
    per_checkpoint: torch.Tensor

    def top(self, fraction: float) -> torch.Tensor:
        """The first ceil(fraction * n_train) ranked indices: LongTensor."""
        if not 0 < fraction <= 1:
            raise TracInError(f"fraction must be in (0, 1], got {fraction}.")
        n = len(self.indices)
        return self.indices[: max(1, math.ceil(fraction * n - 1e-9))]


def checkpoint_weights(index: Any, weights: Any = None,
                       checkpoints: Sequence[int] | None = None) -> torch.Tensor:
    """w_c: Tensor (C,) float64; the learning rates unless `weights`, zero outside `checkpoints`."""
    C = index.store.n_checkpoints
    w = index.learning_rates.clone() if weights is None else torch.as_tensor(weights, dtype=torch.float64).clone()
    if w.shape != (C,) or bool((w < 0).any()):
        raise TracInError(f"weights must be {C} non-negative numbers (one per checkpoint), got {w.tolist()}.")
    if checkpoints is not None:
        chosen = [int(c) % C if -C <= int(c) < C else C for c in checkpoints]
        if not chosen or max(chosen) >= C:
            raise TracInError(f"checkpoints must be a non-empty list of indices in [-{C}, {C}), got {list(checkpoints)}.")
        mask = torch.zeros(C, dtype=torch.bool)
        mask[chosen] = True
        w[~mask] = 0
    if float(w.sum()) <= 0:
        raise TracInError("the checkpoint weights sum to zero; give at least one checkpoint a positive weight.")
    return w


def has_output_norms(index: Any) -> bool:
    """Whether every training row of the index has its output-gradient norm recorded (space="output")."""
    return index.records_outputs and not bool(torch.isnan(index.store.out_sq_norms).any())


def squared_norms(index: Any, space: str = "output") -> torch.Tensor:
    """q_c(z) of the module docstring: Tensor (C, n_train) float64."""
    if space not in SPACES:
        raise TracInError(f"space must be one of {SPACES}, got {space!r}.")
    if space == "parameters":  # the index's own self-influence terms at unit weights (SOURCE: SOURCE(z, z))
        return index.self_influence_per_checkpoint(torch.ones(index.store.n_checkpoints, dtype=torch.float64)).double()
    if not index.records_outputs:
        raise TracInError(f"a {type(index).__name__} has no output-space self-influence; rank by its own "
                          "self-influence with space='parameters'.")
    if bool(torch.isnan(index.store.out_sq_norms).any()):
        raise TracInError("this index has no output-gradient norms for some rows (it was built before they were "
                          "recorded); featurize again into the same store (tracin.index(data, store=path) redoes "
                          "only those rows), or rank in the parameter space with space='parameters'.")
    return index.store.out_sq_norms.double()


def self_influence_terms(index: Any, weights: Any = None, checkpoints: Sequence[int] | None = None,
                         normalize: str = "none", space: str = "output") -> torch.Tensor:
    """Terms t_c(z) of the module docstring: Tensor (C, n_train) float64 (zero rows for unused checkpoints)."""
    if normalize not in NORMALIZE:
        raise TracInError(f"normalize must be one of {NORMALIZE}, got {normalize!r}.")
    w = checkpoint_weights(index, weights, checkpoints)
    q = squared_norms(index, space)
    if normalize == "none":
        return w.unsqueeze(1) * q
    if bool((q < 0).any()):
        raise TracInError(f"normalize={normalize!r} needs non-negative self-influence terms; this index has "
                          "negative ones (SOURCE(z, z) can be negative); use normalize='none'.")
    mean = q.mean(1, keepdim=True).clamp_min(1e-300)
    if normalize == "checkpoint":
        return w.unsqueeze(1) * q / mean
    rel = (q / mean).clamp_min(1e-12).log()
    return (w / w.sum()).unsqueeze(1) * rel


def rank_outliers(index: Any, weights: Any = None, checkpoints: Sequence[int] | None = None,
                  normalize: str = "none", space: str = "output") -> Outliers:
    """All training examples ranked by self-influence (see the module docstring). Returns Outliers."""
    terms = self_influence_terms(index, weights, checkpoints, normalize, space)
    scores = terms.sum(0)
    return Outliers(torch.argsort(scores, descending=True, stable=True), scores, terms)


def _renormalized_blocks(index: Any, t: torch.Tensor, block_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    inv = index.store.sq_norms.sqrt()
    inv = torch.where(inv > 0, 1 / inv.clamp_min(1e-300), torch.zeros_like(inv))
    dtype = accum_dtype(index.store.dtype)
    for start, per in score_blocks(t, index.store, index.learning_rates, index.layout, block_size=block_size,
                                   per_checkpoint=True):
        scale = inv[:, start:start + per.shape[-1]].to(device=per.device, dtype=dtype).unsqueeze(1)
        yield start, (per * scale).sum(0)


def renormalized_influence(index: Any, test_data: Any = None, target: Target = "loss",
                           batch_fn: BatchFn | None = None, *, features: torch.Tensor | None = None,
                           block_size: int = 65536) -> torch.Tensor:
    """R(z, z') = sum_c eta_c <g_c(z'), g_c(z)> / |g_c(z)|: Tensor (n_test, n_train); positive = proponent."""
    t = index.query_features(test_data, target, batch_fn, features)
    return torch.cat([s for _, s in _renormalized_blocks(index, t, block_size)], dim=-1)


def renormalized_top_k(index: Any, test_data: Any = None, k: int = 10, target: Target = "loss",
                       batch_fn: BatchFn | None = None, *, features: torch.Tensor | None = None,
                       block_size: int = 65536) -> TopK:
    """k proponents / opponents per test example by R (streamed over training blocks). Returns TopK."""
    if k < 1:
        raise TracInError(f"k must be at least 1, got {k}.")
    t = index.query_features(test_data, target, batch_fn, features)
    return streaming_top_k(_renormalized_blocks(index, t, block_size), k)
