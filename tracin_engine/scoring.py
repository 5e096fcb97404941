"""Blocked scores between test features and the stored training features.

With per-checkpoint test features T_c (m, D), stored features F_c (n, D) and weights eta_c:
    influence  S = sum_c eta_c T_c F_c^T                                   (m, n)
    similarity S = sum_c w_c (T_c / |T_c|) (F_c / |F_c|)^T, w_c = eta_c / sum eta   in [-1, 1]
    self-influence s(z) = sum_c eta_c ||F_c(z)||^2                            (n,)
Training rows are visited in blocks of `block_size`, so the full (m, n) matrix is never needed by
top-k; accumulation is float32 (float64 when the features are float64).
"""

from __future__ import annotations

from typing import Iterator

import torch

from .store import FeatureStore


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalize(t: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    norms = sq_norms.sqrt().to(t.dtype).clamp_min(torch.finfo(t.dtype).tiny)
    return t / norms.unsqueeze(1)


def score_blocks(test_feats: torch.Tensor, store: FeatureStore, weights: torch.Tensor,
                 normalize: bool = False, block_size: int = 65536, per_checkpoint: bool = False,
                 ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (start, scores) for training rows start..start+b.

    test_feats: (C, m, D). weights: (C,). scores: (m, b), or (C, m, b) when per_checkpoint.
    normalize=True gives cosines (the weights should then sum to 1 for a similarity).
    """
    dtype = accum_dtype(store.dtype)
    device = test_feats.device
    t = test_feats.to(dtype)
    if normalize:
        t = torch.stack([_normalize(t[c], t[c].double().pow(2).sum(1)) for c in range(len(t))])
    w = weights.to(device=device, dtype=dtype)
    for start in range(0, store.n, block_size):
        stop = min(start + block_size, store.n)
        parts = []
        for c in range(store.n_checkpoints):
            f = store.features(c)[start:stop].to(device=device, dtype=dtype)
            if normalize:
                f = _normalize(f, store.sq_norms[c, start:stop].to(device))
            parts.append(w[c] * (t[c] @ f.T))
        yield start, (torch.stack(parts) if per_checkpoint else sum(parts[1:], parts[0]))


def full_scores(test_feats: torch.Tensor, store: FeatureStore, weights: torch.Tensor,
                normalize: bool = False, per_checkpoint: bool = False) -> torch.Tensor:
    """All scores at once: (m, n), or (C, m, n) when per_checkpoint."""
    blocks = [s for _, s in score_blocks(test_feats, store, weights, normalize, per_checkpoint=per_checkpoint)]
    return torch.cat(blocks, dim=-1)


def self_influence(store: FeatureStore, weights: torch.Tensor, per_checkpoint: bool = False) -> torch.Tensor:
    """s(z) = sum_c eta_c ||F_c(z)||^2 from stored squared norms: (n,), or (C, n) terms."""
    terms = weights.to(torch.float64).unsqueeze(1) * store.sq_norms
    return terms if per_checkpoint else terms.sum(0)
