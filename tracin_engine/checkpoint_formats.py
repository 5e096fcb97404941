"""Checkpoint files written by the tools people train with, read without executing pickled code.

Example:
    >>> find_checkpoints("out")           # [(500, out/checkpoint-500), (1000, out/checkpoint-1000)]
    >>> state, facts = read_checkpoint(Path("out/checkpoint-500"))
    >>> facts                              # {"step": 500, "learning_rate": 4.2e-05, "learning_rate_from": ...}
    >>> match_keys(state, model.state_dict())   # 'model.' / 'module.' / '_orig_mod.' prefixes resolved

Formats (checkpoints.py dispatches here for everything but its own checkpoint-<step>.pt files):
  * Hugging Face Trainer folder checkpoint-N/: model.safetensors or pytorch_model.bin (or their
    sharded *.index.json form). step = N. Learning rate: the rate of the steps that led to step N
    (what CheckpointRecorder records): the last 'learning_rate' logged at or before step N in
    trainer_state.json's log_history (the Trainer logs at step s the rate step s used); else the
    scheduler's last rate in scheduler.pt (the next step's rate).
  * PyTorch Lightning .ckpt: its 'state_dict' (keys keep the LightningModule's attribute prefix,
    e.g. 'model.'; match_keys strips it); step = 'global_step'; learning rate from the saved
    optimizer state (param_groups[0]['lr']) or else the scheduler's '_last_lr'.
  * .safetensors files (learning rate and step from the file's metadata when present).
  * PEFT (LoRA) checkpoints: a folder with adapter_model.safetensors / .bin and no full weights (a
    Trainer checkpoint-N of a PeftModel, or save_pretrained's folder) holds the adapter weights only,
    saved without the adapter's name; adapter_state() renames them to the PeftModel's keys and takes
    the frozen base model's weights from the model itself (Checkpoint.extra["adapter"] = True).
Every torch file is read with torch.load(weights_only=True); training_args.bin and optimizer.pt
(pickled objects, or large) are never read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import TracInError

HF_DIR_RE = re.compile(r"checkpoint-(\d+)$")
_STEP_IN_NAME = re.compile(r"step=(\d+)")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")   # PEFT (LoRA): the adapter weights only
_PEFT_NAMED = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save)\.([^.]+)(?=\.|$)")


def handles(path: Path) -> bool:
    """Whether `path` is a format read here (a folder, .safetensors or .ckpt), not a plain torch file."""
    return path.is_dir() or path.suffix in (".safetensors", ".ckpt")


def find_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of Trainer checkpoint-N/ folders, or else of Lightning .ckpt files, ordered by step.

    A Lightning 'last.ckpt' is left out when files named with their step exist (it repeats one)."""
    hf = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := HF_DIR_RE.search(p.name))]
    if hf:
        return sorted(hf)
    ckpts = [p for p in run_dir.iterdir() if p.suffix == ".ckpt"]
    named = [(int(m.group(1)), p) for p in ckpts if (m := _STEP_IN_NAME.search(p.name))]
    if named:
        return sorted(named)
    return sorted((int(_lightning_facts(_torch_load(p)).get("step", 0)), p) for p in ckpts)


def read_checkpoint(path: Path, facts: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict on the CPU, facts: step / learning_rate / learning_rate_from / epoch when known)."""
    if not path.exists():
        raise TracInError(f"checkpoint {path} does not exist; check the path.")
    if path.is_dir():
        return _read_hf_dir(path, facts)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _torch_load(path)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("state_dict"), Mapping):
        raise TracInError(f"{path} is not a PyTorch Lightning checkpoint (no 'state_dict' entry); "
                          "save one with Trainer(...).fit or trainer.save_checkpoint(path).")
    return dict(obj["state_dict"]), (_lightning_facts(obj) if facts else {})


# -- Hugging Face Trainer -------------------------------------------------------------------------
def is_adapter(path: Path) -> bool:
    """Whether `path` is a PEFT adapter checkpoint: a folder with adapter weights and no full model weights."""
    return path.is_dir() and not any((path / f).exists() for f in _WEIGHT_FILES) and \
        any((path / f).exists() for f in _ADAPTER_FILES)


def _read_hf_dir(path: Path, facts: bool) -> tuple[dict, dict]:
    found = [f for f in _WEIGHT_FILES + _ADAPTER_FILES if (path / f).exists()]
    if not found:
        raise TracInError(f"{path} is a folder without model weights (looked for "
                          f"{list(_WEIGHT_FILES + _ADAPTER_FILES)}); pass a Trainer checkpoint-N folder, the run "
                          "folder to Checkpoints.from_dir, or weight files.")
    weights = path / found[0]
    if weights.name in _ADAPTER_FILES:
        state = _read_safetensors(weights)[0] if weights.suffix == ".safetensors" else \
            _plain_state(_torch_load(weights), weights)
        return state, ({**_hf_facts(path), "adapter": True} if facts else {})
    if weights.name.endswith(".index.json"):
        shards = sorted(set(json.loads(weights.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_read_safetensors(path / shard)[0] if shard.endswith(".safetensors")
                         else _plain_state(_torch_load(path / shard), path / shard))
    elif weights.suffix == ".safetensors":
        state = _read_safetensors(weights)[0]
    else:
        state = _plain_state(_torch_load(weights), weights)
    return state, (_hf_facts(path) if facts else {})


def _hf_facts(path: Path) -> dict[str, Any]:
    m = HF_DIR_RE.search(path.name)
    out: dict[str, Any] = {}
    if m:
        out["step"] = int(m.group(1))
    state_file = path / "trainer_state.json"
    log: list = []
    if state_file.exists():
        ts = json.loads(state_file.read_text())
        out.setdefault("step", int(ts.get("global_step", 0)))
        out["epoch"] = ts.get("epoch")
        log = ts.get("log_history", [])
    # The rate that weighs checkpoint N is the rate of the steps that led to it (as CheckpointRecorder
    # records it). The Trainer logs at step s the rate step s used, so: the last one logged at or
    # before N. (scheduler.pt's _last_lr is the next step's rate: 0 at the end of a linear schedule.)
    step = out.get("step", 0)
    logged = [e for e in log if "learning_rate" in e and e.get("step", 0) <= step]
    if logged:
        entry = max(logged, key=lambda e: e["step"])
        out["learning_rate"] = float(entry["learning_rate"])
        out["learning_rate_from"] = f"trainer_state.json log_history (step {entry['step']})"
        return out
    sched = path / "scheduler.pt"
    if sched.exists():
        try:
            last = torch.load(sched, map_location="cpu", weights_only=True).get("_last_lr")
            if last:
                out["learning_rate"] = float(last[0])
                out["learning_rate_from"] = "scheduler.pt (_last_lr: the rate of the next step)"
        except Exception:  # noqa: BLE001 - an unreadable scheduler file: no learning rate from it
            pass
    return out


# -- PyTorch Lightning ----------------------------------------------------------------------------
def _lightning_facts(obj: Mapping) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "global_step" in obj:
        out["step"] = int(obj["global_step"])
    if "epoch" in obj:
        out["epoch"] = int(obj["epoch"])
    for opt in obj.get("optimizer_states") or []:
        groups = opt.get("param_groups") if isinstance(opt, Mapping) else None
        if groups and "lr" in groups[0]:
            out["learning_rate"] = float(groups[0]["lr"])
            out["learning_rate_from"] = "optimizer_states[0] param_groups[0]['lr']"
            return out
    for sched in obj.get("lr_schedulers") or []:
        last = sched.get("_last_lr") if isinstance(sched, Mapping) else None
        if last:
            out["learning_rate"] = float(last[0])
            out["learning_rate_from"] = "lr_schedulers[0]['_last_lr']"
            return out
    return out


# -- files ----------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        from safetensors import safe_open
    except ImportError:
        raise TracInError(f"{path} is a safetensors file; install the reader: pip install safetensors.") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001
        raise TracInError(f"could not read safetensors file {path}: {exc}") from exc
    facts: dict[str, Any] = {}
    for key, cast in (("learning_rate", float), ("lr", float), ("step", int)):
        if key in meta:
            try:
                facts["learning_rate" if key == "lr" else key] = cast(meta[key])
            except ValueError:
                pass
    return state, facts


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types
        raise TracInError(f"could not read {path} safely (torch.load with weights_only=True, which never runs "
                          f"pickled code): {exc}. Save the weights with torch.save(model.state_dict(), path) "
                          "or safetensors.") from exc


def _plain_state(obj: Any, path: Path) -> dict:
    if not isinstance(obj, Mapping):
        raise TracInError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    return dict(obj)


# -- matching a state dict to a model ---------------------------------------------------------------
def tied_aliases(model_state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys of tensors that share memory with an earlier key (tied weights): alias -> first key."""
    first: dict[tuple, str] = {}
    out = {}
    for k, v in model_state.items():
        if not torch.is_tensor(v) or v.numel() == 0:
            continue
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if ident in first:
            out[k] = first[ident]
        else:
            first[ident] = k
    return out


def adapter_state(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
                  trainable: set[str], name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A PEFT adapter checkpoint as a full state dict of the model (a PeftModel, or a module holding one).

    The file names each adapter weight without the adapter's name (q_proj.lora_A.weight for the model's
    q_proj.lora_A.default.weight; classifier.weight for classifier.modules_to_save.default.weight, the
    copy PEFT trains) and may lack the wrapper's prefix (match_keys). Every trainable parameter must be
    in the file; the frozen ones (the base model, which LoRA training never changes) come from the model.
    """
    adapters = {m.group(2) for k in model_state for m in _PEFT_NAMED.finditer(k)}
    if len(adapters) != 1:
        raise TracInError(f"{name} is a PEFT adapter checkpoint, but the model holds "
                          f"{'no adapter' if not adapters else f'several adapters {sorted(adapters)}'}; pass the "
                          "PeftModel the adapter was trained as (get_peft_model(base, config)), with one adapter.")
    a = re.escape(adapters.pop())
    as_saved = {re.sub(rf"\.(lora_[A-Za-z_]+)\.{a}(?=\.|$)", r".\1", re.sub(rf"\.modules_to_save\.{a}\.", ".", k)): k
                for k in model_state if k in trainable}
    renamed = match_keys(state, {s: model_state[k] for s, k in as_saved.items()}, name)
    missing = sorted(k for s, k in as_saved.items() if s not in renamed)
    if missing:
        raise TracInError(f"{name} (a PEFT adapter checkpoint) lacks trainable parameters of the model: {missing[:10]}"
                          f"{' ...' if len(missing) > 10 else ''}; was it saved from this PeftModel's adapter "
                          "(same target_modules and modules_to_save)?")
    full = {k: v for k, v in model_state.items() if k not in trainable}
    full.update({as_saved[s]: v for s, v in renamed.items() if s in as_saved})
    return full


def match_keys(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor],
               name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """`state` renamed to the model's keys when one prefix rule explains it, tied weights filled in.

    Rules tried when keys differ: strip a prefix p from the file's keys (p + key: 'module.' from
    DataParallel, 'model.' from Lightning, '_orig_mod.' from torch.compile, or any wrapper
    attribute; file keys without p are dropped), or add one (the model is the wrapper). Exactly one
    rule that yields every model key is applied; several raise TracInError listing them; none
    returns `state` unchanged (the caller reports missing and unexpected keys). Keys of weights
    tied to another (GPT-2's lm_head.weight) may be absent: they are filled from their twin.
    """
    aliases = tied_aliases(model_state)
    required = [k for k in model_state if k not in aliases]
    model_keys = set(model_state)
    keys = set(state)
    if not all(k in keys for k in required):
        by_rest: dict[str, set[str]] = {}
        for k in keys:
            for i, ch in enumerate(k):
                if ch == ".":
                    by_rest.setdefault(k[i + 1:], set()).add(k[:i + 1])
        strip = set.intersection(*(by_rest.get(m, set()) for m in required)) if required else set()
        first = required[0] if required else ""
        add = {first[:i + 1] for i, ch in enumerate(first) if ch == "."}
        add = {p for p in add if all(m.startswith(p) and m[len(p):] in keys for m in required)}
        rules = [("strip", p) for p in sorted(strip)] + [("add", p) for p in sorted(add)]
        if len(rules) > 1:
            raise TracInError(f"{name}'s keys fit the model under several prefix rules {rules}; rename the keys "
                              "yourself and pass the state dicts to Checkpoints.from_state_dicts(...).")
        if not rules:
            return dict(state)
        how, p = rules[0]
        if how == "strip":
            state = {k[len(p):]: v for k, v in state.items() if k.startswith(p) and k[len(p):] in model_keys}
        else:
            state = {p + k: v for k, v in state.items() if p + k in model_keys}
    state = dict(state)
    for alias, twin in aliases.items():
        if alias not in state and twin in state:
            state[alias] = state[twin]
    return state
