"""Checkpoints of one training run, each with the learning rate of the steps that led to it.

Example:
    >>> recorder = CheckpointRecorder("runs/digits")          # in the training loop
    >>> recorder.save(model, optimizer, step)                  # writes state dict + lr + step
    >>> ckpts = Checkpoints.from_dir("runs/digits")            # ordered by step
    >>> ckpts = Checkpoints.from_files(paths, learning_rates=[0.1, 0.1, 0.05])

TracInCP weights checkpoint i by its learning rate eta_i:
    TracInCP(z, z') = sum_i eta_i <grad l(w_i, z), grad l(w_i, z')>
The checkpoint's gradient stands in for the steps since the previous checkpoint, so eta_i is the
rate those steps used (what CheckpointRecorder records when save() runs after the interval's last
optimizer.step() and before scheduler.step(); a Trainer folder's rate logged at step N).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from . import checkpoint_formats as formats
from .errors import TracInError
from .fingerprint import state_digest

_STATE_KEYS = ("state_dict", "model_state_dict", "model")
_LR_KEYS = ("learning_rate", "lr")
_FILE_PATTERN = "checkpoint-{step:08d}.pt"
_FILE_RE = re.compile(r"checkpoint-(\d+)\.pt$")


@dataclass(frozen=True)
class Checkpoint:
    """One saved model state.

    source: a file path or an in-memory state dict; learning_rate: eta_i;
    step: optimizer steps taken before it was saved (None if unknown);
    extra: optimizer facts the recorder saved (momentum, batch_size, ...); "adapter": True for a PEFT
    adapter checkpoint (the adapter weights only: checkpoint_formats.adapter_state).
    """

    source: Any
    learning_rate: float
    step: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        if isinstance(self.source, (str, os.PathLike)):
            return Path(self.source).name
        return f"in-memory@{self.step}" if self.step is not None else "in-memory"


def _split_payload(obj: Any, where: str) -> tuple[dict, dict]:
    """A loaded file -> (state_dict, facts). Accepts a bare state dict or a dict holding one."""
    if not isinstance(obj, Mapping):
        raise TracInError(
            f"{where} holds a {type(obj).__name__}, not a state dict. "
            "Save checkpoints with torch.save(model.state_dict(), path) or CheckpointRecorder.save."
        )
    for key in _STATE_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            return dict(inner), {k: v for k, v in obj.items() if k != key}
    return dict(obj), {}


def _read_lr(facts: Mapping[str, Any]) -> Any:
    """The learning rate a file stores (as stored: checked by check_learning_rate), or None."""
    for key in _LR_KEYS:
        if key in facts:
            return facts[key]
    return None


def check_learning_rate(value: Any, where: str) -> float:
    """`value` as a float if it is a finite positive number (a Python or NumPy number, or a
    one-element tensor), else a TracInError naming `where` (the checkpoint)."""
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TracInError(f"the learning rate of {where} is {value!r} ({type(value).__name__}), not a number; "
                          "pass learning_rates=[0.1, ...] as numbers.")
    lr = float(value)
    if not (math.isfinite(lr) and lr > 0):
        raise TracInError(f"the learning rate of {where} is {lr}; TracInCP weights each checkpoint by its "
                          "learning rate, which must be finite and positive. Pass the rate the optimizer "
                          "used after that checkpoint (learning_rates=[...]).")
    return lr


def _read(path: Path, facts: bool = True) -> tuple[dict, dict]:
    """(state dict, facts) of a checkpoint file or folder in any format (see checkpoint_formats.py)."""
    if formats.handles(path):
        return formats.read_checkpoint(path, facts)
    return _split_payload(_load_file(path), str(path))


def _load_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TracInError(f"checkpoint file {path} does not exist; check the path.") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise TracInError(
            f"could not read checkpoint {path}: {exc}. Is it a file written by torch.save?"
        ) from exc


class Checkpoints(Sequence[Checkpoint]):
    """An ordered list of checkpoints with learning rates; loads state dicts, caching small ones.

    learning_rates: Tensor (n_checkpoints,) float64.
    """

    def __init__(self, checkpoints: Sequence[Checkpoint], cache_bytes: int = 512 * 2**20):
        if len(checkpoints) == 0:
            raise TracInError("no checkpoints given; TracInCP needs at least one saved model state.")
        self._items = list(checkpoints)
        for i, c in enumerate(self._items):
            check_learning_rate(c.learning_rate, f"checkpoint {i} ({c.name})")
        paths = [str(Path(c.source).resolve()) for c in self._items if isinstance(c.source, (str, os.PathLike))]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            warnings.warn(f"the same checkpoint file is listed more than once: {repeated}; each listing "
                          "counts as a separate checkpoint in TracInCP's sum.", stacklevel=2)
        self._cache: OrderedDict[int, dict] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._digests: dict[int, str] = {}

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], learning_rates: Sequence[float] | None = None,
                   steps: Sequence[int] | None = None) -> "Checkpoints":
        """Files written by torch.save (a state dict, or a dict holding one plus `learning_rate`),
        Hugging Face Trainer checkpoint-N folders, Lightning .ckpt or .safetensors files
        (checkpoint_formats.py); learning rates and steps are read from them when not given."""
        paths = [Path(p) for p in paths]
        if not paths:
            raise TracInError("from_files got an empty list of paths.")
        if learning_rates is not None and len(learning_rates) != len(paths):
            raise TracInError(
                f"got {len(learning_rates)} learning rates for {len(paths)} checkpoints; "
                "pass one learning rate per checkpoint, in the same order."
            )
        items = []
        for i, path in enumerate(paths):
            if learning_rates is not None:
                lr, step = check_learning_rate(learning_rates[i], f"checkpoint {i} ({path.name})"), None
                if not path.exists():
                    raise TracInError(f"checkpoint file {path} does not exist; check the path.")
                extra = {"adapter": True} if formats.is_adapter(path) else {}
            else:
                _, facts = _read(path)
                lr = _read_lr(facts)
                if lr is None:
                    raise TracInError(
                        f"{path} stores no learning rate; pass learning_rates=[...] to from_files "
                        "or save checkpoints with CheckpointRecorder."
                    )
                lr = check_learning_rate(lr, f"checkpoint {i} ({path.name})")
                step, extra = facts.get("step"), {k: v for k, v in facts.items() if k not in _LR_KEYS + ("step",)}
            items.append(Checkpoint(path, lr, steps[i] if steps is not None else step, extra))
        return cls(items)

    @classmethod
    def from_state_dicts(cls, state_dicts: Sequence[Mapping[str, torch.Tensor]],
                         learning_rates: Sequence[float], steps: Sequence[int] | None = None) -> "Checkpoints":
        """In-memory state dicts (copied), one learning rate each."""
        if len(learning_rates) != len(state_dicts):
            raise TracInError(
                f"got {len(learning_rates)} learning rates for {len(state_dicts)} checkpoints; "
                "pass one learning rate per checkpoint."
            )
        items = [
            Checkpoint({k: v.detach().clone().cpu() for k, v in sd.items()}, check_learning_rate(lr, f"checkpoint {i}"),
                       steps[i] if steps is not None else i)
            for i, (sd, lr) in enumerate(zip(state_dicts, learning_rates))
        ]
        return cls(items)

    @classmethod
    def from_dir(cls, run_dir: str | os.PathLike) -> "Checkpoints":
        """Checkpoints in run_dir, ordered by step: files written by CheckpointRecorder, a Hugging Face
        Trainer output folder (checkpoint-N/ folders) or a PyTorch Lightning folder of .ckpt files."""
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise TracInError(f"{run_dir} is not a directory; pass the folder CheckpointRecorder wrote.")
        found = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _FILE_RE.search(p.name)))
        found = found or formats.find_checkpoints(run_dir)
        if not found:
            raise TracInError(
                f"{run_dir} holds no checkpoint-<step>.pt files, Trainer checkpoint-<step>/ folders or "
                "Lightning .ckpt files; record them with CheckpointRecorder(run_dir).save(model, optimizer, step)."
            )
        return cls.from_files([p for _, p in found])

    # -- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Checkpoints(self._items[i], self._cache_bytes)
        return self._items[i]

    def __repr__(self) -> str:
        lrs = ", ".join(f"{c.learning_rate:g}" for c in self._items)
        return f"Checkpoints(n={len(self)}, learning_rates=[{lrs}])"

    @property
    def learning_rates(self) -> torch.Tensor:
        return torch.tensor([c.learning_rate for c in self._items], dtype=torch.float64)

    def load(self, i: int) -> dict[str, torch.Tensor]:
        """State dict of checkpoint i on the CPU. Cached while the cache stays under cache_bytes."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        ckpt = self._items[i]
        if isinstance(ckpt.source, Mapping):
            state = dict(ckpt.source)
        else:
            state, _ = _read(Path(ckpt.source), facts=False)
        if i not in self._digests:  # computed once, while loading
            self._digests[i] = state_digest(state)
        size = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        if size <= self._cache_bytes:
            self._cache[i] = state
            while sum(_nbytes(s) for s in self._cache.values()) > self._cache_bytes:
                self._cache.popitem(last=False)
        return state

    def digest(self, i: int) -> str:
        """Content digest of checkpoint i's tensors (fingerprint.state_digest), computed when it is
        first loaded (loading it now if it never was)."""
        if i not in self._digests:
            self.load(i)
        return self._digests[i]

    def fingerprint(self) -> list[dict]:
        """JSON-able identity of each checkpoint: name, learning rate, step and `digest`, a content
        hash of its tensors (names, dtypes, shapes, values). Warns when two hold the same tensors."""
        out = [{"name": c.name, "learning_rate": c.learning_rate, "step": c.step, "digest": self.digest(i)}
               for i, c in enumerate(self._items)]
        digests = [e["digest"] for e in out]
        same = [i for i, d in enumerate(digests) if digests.count(d) > 1]
        if same:
            warnings.warn(f"checkpoints {same} hold identical weights; each counts separately in TracInCP's sum "
                          "(was one file listed twice?).", stacklevel=2)
        return out


def _nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


class CheckpointRecorder:
    """Writes run_dir/checkpoint-<step>.pt holding state dict, current learning rate and step.

    It records optimizer.param_groups[0]["lr"] when save() runs. TracInCP weighs a checkpoint by the
    rate of the steps since the previous checkpoint, whose gradient it stands in for: call save()
    after the interval's last optimizer.step() and before scheduler.step() (called after, it records
    the next interval's rate).

    Example (inside a training loop):
        >>> recorder = CheckpointRecorder("runs/digits", every=50)
        >>> recorder.save(model, optimizer, step)   # saves when step % every == 0 (every=None: always)
    """

    def __init__(self, run_dir: str | os.PathLike, every: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.every = every
        self.paths: list[Path] = []

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
             **facts: Any) -> Path | None:
        """Save now (or skip when `every` says so). Returns the path written, or None."""
        if self.every is not None and step % self.every != 0:
            return None
        group = optimizer.param_groups[0]
        lr = group["lr"]
        payload = {
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "learning_rate": float(lr.item() if torch.is_tensor(lr) else lr),
            "step": int(step),
            "optimizer": type(optimizer).__name__,
            "momentum": float(group.get("momentum", 0.0) or 0.0),
            **facts,
        }
        if "betas" in group:
            payload["betas"] = [float(b) for b in group["betas"]]
        path = self.run_dir / _FILE_PATTERN.format(step=int(step))
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)  # a crash never leaves a half-written checkpoint behind
        self.paths.append(path)
        return path


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Short hash of parameter names and shapes (identifies a model architecture)."""
    desc = json.dumps([(k, list(v.shape), str(v.dtype)) for k, v in state.items() if torch.is_tensor(v)])
    return hashlib.sha1(desc.encode()).hexdigest()[:16]
