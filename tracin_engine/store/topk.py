"""Streaming top-k over score blocks: proponents (largest scores) and opponents (most negative).

Example:
    >>> result = streaming_top_k(score_blocks(...), k=10)
    >>> result.proponents.indices        # (m, k) int64, best first
    >>> result.opponents.scores          # (m, k), most negative first
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass(frozen=True)
class Neighbors:
    """indices: (m, k) int64 training indices; scores: (m, k) their scores, ranked."""

    indices: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True)
class TopK:
    """Ranked proponents (positive scores: they reduce the test loss) and opponents (negative)."""

    proponents: Neighbors
    opponents: Neighbors

    @staticmethod
    def concat(parts: list["TopK"]) -> "TopK":
        """Stack results of consecutive chunks of test examples."""
        cat = lambda xs: torch.cat(xs)  # noqa: E731
        return TopK(Neighbors(cat([p.proponents.indices for p in parts]), cat([p.proponents.scores for p in parts])),
                    Neighbors(cat([p.opponents.indices for p in parts]), cat([p.opponents.scores for p in parts])))

    def __getitem__(self, row: int) -> "TopK":
        """The result for test example `row`, with shapes (1, k)."""
        sl = slice(row, row + 1)
        return TopK(Neighbors(self.proponents.indices[sl], self.proponents.scores[sl]),
                    Neighbors(self.opponents.indices[sl], self.opponents.scores[sl]))


def _merge(best: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor, start: int, k: int,
           largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    kk = min(k, scores.shape[1])
    vals, idx = scores.topk(kk, dim=1, largest=largest)
    idx = idx + start
    if best is not None:
        vals, idx = torch.cat([best[0], vals], 1), torch.cat([best[1], idx], 1)
        kk = min(k, vals.shape[1])
        vals, pos = vals.topk(kk, dim=1, largest=largest)
        idx = idx.gather(1, pos)
    return vals, idx


def streaming_top_k(blocks: Iterable[tuple[int, torch.Tensor]], k: int) -> TopK:
    """blocks: (start, scores (m, b)) in any order -> TopK with k (or n if smaller) per side."""
    pro = opp = None
    for start, scores in blocks:
        pro = _merge(pro, scores, start, k, largest=True)
        opp = _merge(opp, scores, start, k, largest=False)
    return TopK(Neighbors(pro[1].cpu(), pro[0].cpu()), Neighbors(opp[1].cpu(), opp[0].cpu()))


def reference_top_k(scores: torch.Tensor, k: int) -> TopK:
    """The same from a full (m, n) matrix with one sort; the slow reference for tests."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    k = min(k, scores.shape[1])
    pro, opp = order[:, :k], order.flip(1)[:, :k]
    return TopK(Neighbors(pro, scores.gather(1, pro)), Neighbors(opp, scores.gather(1, opp)))
