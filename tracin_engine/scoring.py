"""Blocked scores between test features and the stored training features.

With per-checkpoint test features T_c (m, D), stored features F_c (n, D) and weights eta_c:
    influence  S = sum_c eta_c <T_c, F_c>                                   (m, n)
    similarity S = sum_c w_c <T_c, F_c> / (|T_c| |F_c|), w_c = eta_c / sum eta   in [-1, 1]
where <., .> and |.| are those of the gradients the rows represent (Layout.dots / sq_norms).
    self-influence s(z) = sum_c eta_c ||F_c(z)||^2                            (n,)
Training rows are visited in blocks of `block_size`, so the full (m, n) matrix is never needed by
top-k; accumulation is float32 (float64 when the features are float64).
"""

from __future__ import annotations

from typing import Iterator

import torch

from .layout import Layout
from .store import FeatureStore


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inv_norms(sq_norms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return sq_norms.sqrt().to(dtype).clamp_min(torch.finfo(dtype).tiny).reciprocal()


def default_block_size(m: int, n_checkpoints: int, per_checkpoint: bool, budget_bytes: int = 2**28) -> int:
    """Training rows per block so that one block of scores stays near `budget_bytes` (>= 1024 rows)."""
    per_row = 4 * max(m, 1) * (n_checkpoints + 1 if per_checkpoint else 2)
    return max(1024, budget_bytes // per_row)


def score_blocks(test_feats: torch.Tensor, store: FeatureStore, weights: torch.Tensor, layout: Layout,
                 normalize: bool = False, block_size: int | None = None, per_checkpoint: bool = False,
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, scores) for training rows start..start+b.

    test_feats: (C, m, D) rows of `layout`. weights: (C,). scores: (m, b), or (C, m, b) when
    per_checkpoint. normalize=True divides each term by |g_c(z')| |g_c(z)| (cosines; the weights
    should then sum to 1 for a similarity). block_size None: about 256 MB of scores per block.
    """
    block_size = block_size or default_block_size(test_feats.shape[1], store.n_checkpoints, per_checkpoint)
    dtype = accum_dtype(store.dtype)
    device = test_feats.device
    t = test_feats.to(dtype)
    t_inv = [_inv_norms(layout.sq_norms(t[c]), dtype) for c in range(len(t))] if normalize else None
    w = weights.to(device=device, dtype=dtype)
    for start in range(0, store.n, block_size):
        stop = min(start + block_size, store.n)
        total = torch.zeros(store.n_checkpoints if per_checkpoint else 1, t.shape[1], stop - start,
                            dtype=dtype, device=device)
        for c in range(store.n_checkpoints):
            f = store.features(c)[start:stop].to(device=device, dtype=dtype)
            d = layout.dots(t[c], f)
            if normalize:
                d = d * t_inv[c].unsqueeze(1) * _inv_norms(store.sq_norms[c, start:stop].to(device), dtype)
            total[c if per_checkpoint else 0].add_(d, alpha=float(w[c]))
        yield start, (total if per_checkpoint else total[0])


def full_scores(test_feats: torch.Tensor, store: FeatureStore, weights: torch.Tensor, layout: Layout,
                normalize: bool = False, per_checkpoint: bool = False) -> torch.Tensor:
    """All scores at once: (m, n), or (C, m, n) when per_checkpoint."""
    blocks = [s for _, s in score_blocks(test_feats, store, weights, layout, normalize,
                                         per_checkpoint=per_checkpoint)]
    return torch.cat(blocks, dim=-1)


def self_influence(store: FeatureStore, weights: torch.Tensor, per_checkpoint: bool = False) -> torch.Tensor:
    """s(z) = sum_c eta_c ||F_c(z)||^2 from stored squared norms: (n,), or (C, n) terms."""
    terms = weights.to(torch.float64).unsqueeze(1) * store.sq_norms
    return terms if per_checkpoint else terms.sum(0)
