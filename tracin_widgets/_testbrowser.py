"""Which test examples are worth a look: the model's outcome on each (label, prediction, loss, confidence).

Example:
    >>> tb = TestOutcomes(index, test_source)
    >>> tb.order("mistakes")                  # LongTensor: misclassified first, then by loss (highest first)
    >>> tb.order("loss", true=3, pred=5)      # only test examples labelled 3 and predicted 5
    >>> tb.confusion()                        # LongTensor (K, K): rows true class, columns predicted

Outcomes come from one forward pass at the last checkpoint (eval mode): pred = argmax f(x),
confidence = max softmax f(x), loss = l(f(x), y) per example (cross-entropy for class labels).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import _engine as eng

SORTS = {"mistakes": "misclassified first, then highest loss", "loss": "highest loss first",
         "confidence": "least confident first", "index": "by index"}


class TestOutcomes:
    """Outcome of every test example: labels (n,), preds (n,) | None, loss (n,) float64, confidence (n,) | None."""

    def __init__(self, index: Any, test: Any):
        self.n = len(test)
        outputs = eng.model_outputs(index, test)
        labels = test.labels()
        self.labels = labels
        self.classes = (outputs.dim() == 2 and labels is not None and labels.dim() == 1
                        and not labels.is_floating_point())
        if self.classes:
            probs = torch.softmax(outputs.double(), 1)
            self.preds = probs.argmax(1)
            self.confidence = probs.max(1).values
            self.n_classes = max(int(outputs.shape[1]), int(labels.max()) + 1)
        else:
            self.preds, self.confidence, self.n_classes = None, None, 0
        self.loss = (eng.example_losses(index, outputs, labels) if labels is not None
                     else torch.full((self.n,), float("nan"), dtype=torch.float64))
        self._orders: dict[tuple, torch.Tensor] = {}

    def wrong(self) -> torch.Tensor:
        """BoolTensor (n,): predicted class differs from the label (all False without class labels)."""
        if not self.classes:
            return torch.zeros(self.n, dtype=torch.bool)
        return self.preds != self.labels

    def order(self, sort: str = "mistakes", true: int | None = None, pred: int | None = None) -> torch.Tensor:
        """Test indices, filtered by true / predicted class, in the `sort` order (see SORTS): LongTensor (m,)."""
        key = (sort, true, pred)
        hit = self._orders.get(key)
        if hit is not None:
            return hit
        idx = torch.arange(self.n)
        if self.classes:
            keep = torch.ones(self.n, dtype=torch.bool)
            if true is not None:
                keep &= self.labels == int(true)
            if pred is not None:
                keep &= self.preds == int(pred)
            idx = idx[keep]
        loss = torch.nan_to_num(self.loss[idx], nan=-math.inf)
        if sort == "mistakes":       # stable sorts: by loss, then misclassified to the front
            idx = idx[torch.argsort(loss, descending=True, stable=True)]
            idx = idx[torch.argsort((~self.wrong()[idx]).to(torch.int8), stable=True)]
        elif sort == "loss":
            idx = idx[torch.argsort(loss, descending=True, stable=True)]
        elif sort == "confidence" and self.confidence is not None:
            idx = idx[torch.argsort(self.confidence[idx], stable=True)]
        self._orders[key] = idx
        return idx

    def confusion(self) -> torch.Tensor:
        """LongTensor (K, K): counts of test examples with true class r (row) and predicted class c (column)."""
        if not self.classes:
            return torch.zeros(0, 0, dtype=torch.long)
        K = self.n_classes
        return torch.bincount(self.labels.long() * K + self.preds, minlength=K * K).reshape(K, K)

    def describe(self, i: int) -> str:
        """A short line for a tile: 'loss 2.31 · 41%' (confidence of the predicted class)."""
        parts = []
        if not math.isnan(float(self.loss[i])):
            parts.append(f"loss {float(self.loss[i]):.3g}")
        if self.confidence is not None:
            parts.append(f"{100 * float(self.confidence[i]):.0f}%")
        return " \u00b7 ".join(parts)
