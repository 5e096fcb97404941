"""Review results kept and used: marks in a sidecar file, the cleaned training set for retraining.

Example:
    >>> g = tw.SelfInfluenceGallery(index, train)          # marks load from / save to the sidecar beside a disk index
    >>> g.mark([12], "suspicious"); g.relabel(40, 3)         # or keys s / f / a in the gallery
    >>> clean = g.cleaned()                                 # CleanedData: suspicious dropped, relabels applied
    >>> X, y = clean.tensors()                              # or DataLoader(clean, ...) for retraining
    >>> tw.cleaned_dataset(train, {12: "suspicious"}, {40: 3})   # the same without a gallery

Sidecar file (JSON, written only by tracin): {"format": "tracin-review-marks", "version": 1,
"n_train": n, "marks": {"12": "suspicious"}, "relabels": {"40": 3}}. A file at that path that is not
in this format is never overwritten: MarksFile raises a TracInError naming it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from ._engine import TracInError, as_source

FORMAT = "tracin-review-marks"
SIDECAR = "tracin_review_marks.json"
MARKS = ("suspicious", "fine", "relabel")


class MarksFile:
    """A sidecar JSON file of review marks. load() -> (marks, relabels); save(marks, relabels) writes atomically."""

    def __init__(self, path: str | Path, n_train: int):
        self.path = Path(path)
        self.n_train = int(n_train)
        if self.path.exists() and not self.is_ours(self.path):
            raise TracInError(f"{self.path} exists and was not written by tracin (not a {FORMAT} file); it is left "
                              "alone. Pass marks_file= another path, or marks_file=None to keep marks in memory.")

    @staticmethod
    def is_ours(path: Path) -> bool:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("format") == FORMAT

    def load(self) -> tuple[dict[int, str], dict[int, int]]:
        """(marks, relabels) saved before, or ({}, {}) when the file does not exist yet."""
        if not self.path.exists():
            return {}, {}
        data = json.loads(self.path.read_text())
        if int(data.get("n_train", -1)) != self.n_train:
            raise TracInError(f"{self.path} holds marks for {data.get('n_train')} training examples, this index has "
                              f"{self.n_train}; pass marks_file= another path for this training set.")
        marks = {int(k): str(v) for k, v in data.get("marks", {}).items() if v in MARKS}
        relabels = {int(k): int(v) for k, v in data.get("relabels", {}).items()}
        return marks, relabels

    def save(self, marks: dict[int, str], relabels: dict[int, int]) -> None:
        """Write the marks (atomic: a temporary file in the same folder, then rename)."""
        if self.path.exists() and not self.is_ours(self.path):
            raise TracInError(f"{self.path} is no longer a {FORMAT} file; not overwriting it.")
        data = {"format": FORMAT, "version": 1, "n_train": self.n_train,
                "marks": {str(k): v for k, v in sorted(marks.items())},
                "relabels": {str(k): int(v) for k, v in sorted(relabels.items())}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tracin_marks_", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)


class CleanedData(torch.utils.data.Dataset):
    """Training data after review: `kept` (LongTensor (m,), original indices in order) with labels replaced.

    Items are (x, y) like the original data's; `tensors()` stacks them into (X (m, ...), y (m,)).
    """

    def __init__(self, train_data: Any, kept: torch.Tensor, relabels: dict[int, int]):
        self.source = as_source(train_data)
        self.kept = kept.long()
        self.relabels = dict(relabels)

    def __len__(self) -> int:
        return len(self.kept)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        i = int(self.kept[j])
        x, y = self.source.example(i)
        if i in self.relabels:
            y = torch.as_tensor(self.relabels[i], dtype=y.dtype if y is not None else torch.long)
        return x, y

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, y) stacked: shapes (m, ...) and (m, ...); y holds the new labels."""
        xs, ys = zip(*(self[j] for j in range(len(self)))) if len(self) else ((), ())
        if not xs:
            raise TracInError("every training example was dropped; nothing is left to stack.")
        return torch.stack(list(xs)), torch.stack([torch.as_tensor(v) for v in ys])


def cleaned_dataset(train_data: Any, marks: dict[int, str], relabels: dict[int, int] | None = None,
                    drop: Iterable[str] = ("suspicious",)) -> CleanedData:
    """The training data without examples whose mark is in `drop`, with `relabels` {index: new label} applied.

    Relabelled examples are kept (a relabel overrides a "suspicious" mark given earlier to the same example).
    """
    drop = set(drop)
    unknown = drop - set(MARKS)
    if unknown:
        raise TracInError(f"drop names unknown marks {sorted(unknown)}; marks are {MARKS}.")
    relabels = dict(relabels or {})
    n = len(as_source(train_data))
    bad = [i for i in list(marks) + list(relabels) if not 0 <= int(i) < n]
    if bad:
        raise TracInError(f"training indices {bad[:5]} are out of range (0..{n - 1}).")
    gone = {int(i) for i, m in marks.items() if m in drop and int(i) not in relabels}
    kept = torch.tensor([i for i in range(n) if i not in gone], dtype=torch.long)
    return CleanedData(train_data, kept, {int(k): int(v) for k, v in relabels.items()})
