"""Per-example gradients at one checkpoint, flattened over the selected parameters.

Example:
    >>> gc = GradientComputer(model, F.cross_entropy, layers="last")
    >>> state = gc.prepare(checkpoints.load(0))          # validated, on the device
    >>> G = gc.per_example(state, X, y)                  # Tensor (B, P), P = gc.num_params

The objective for one example z = (x, y) at weights w, with f = model(x[None]) (called through
calls.call_model: x a tensor, a tuple or a dict of tensors; the output tensor picked by output_fn), is
    target="loss":        l(w, z) = loss(f, y[None])           (loss: losses.py, named or a function)
    target="prediction":  loss.prediction(f, c): -logit_c for classification, c the class the final
                          checkpoint predicts; -log p(tokens) for language models (losses.py)
    target=g (callable):  -g(f)                                (proponents increase g)
so a positive TracIn score always means "training on z moved the model towards this output".
The fast path is torch.func.vmap over torch.func.grad; `reference` is a slow loop kept for tests.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
from torch.func import grad, vmap

from .. import inputs as tree
from ..checkpoint_formats import adapter_state, match_keys, tied_aliases
from ..devices import resolve_device
from ..errors import TracInError
from ..losses import Loss, resolve_loss
from ..memory import budget, is_oom
from .calls import OutputFn, call_model

Target = Any  # "loss" | "prediction" | Callable[[Tensor (1, ...)], Tensor (one value)]
_SLOW_RULE = "There is a performance drop because we have not yet implemented the batching rule"


class VmapFailed(TracInError):
    """torch.func (vmap over grad) cannot run this model; the per-example loop can (per_example="auto"
    falls back to it with one warning)."""


def parameter_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Module name -> names of its own trainable parameters, for modules that have any.

    A parameter shared by several modules (tied weights: GPT-2's lm_head and token embedding)
    belongs to the first module that holds it, under the name model.named_parameters() gives it.
    """
    canon = {id(t): n for n, t in model.named_parameters()}
    groups: dict[str, list[str]] = {}
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        own = [prefix + p for p, t in mod.named_parameters(recurse=False)
               if t.requires_grad and canon.get(id(t)) == prefix + p]
        if own:
            groups[mod_name] = own
    return groups


def last_layer_parameters(model: torch.nn.Module) -> list[str]:
    """The parameters of the last module (in registration order) that owns trainable ones, tied
    ones included: for GPT-2, lm_head, whose weight is wte.weight (under its canonical name)."""
    canon = {id(t): n for n, t in model.named_parameters()}
    last: list[str] = []
    for _, mod in model.named_modules():
        own = [canon[id(t)] for _, t in mod.named_parameters(recurse=False) if t.requires_grad and id(t) in canon]
        if own:
            last = own
    return last


def select_parameters(model: torch.nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    """Parameter names for layers=None (all trainable), "last" (final layer) or module names."""
    groups = parameter_groups(model)
    if not groups:
        raise TracInError("the model has no trainable parameters (requires_grad=True); nothing to attribute.")
    if layers is None:
        return [n for names in groups.values() for n in names]
    if isinstance(layers, str) and layers == "last":
        return last_layer_parameters(model)
    if isinstance(layers, str):
        layers = [layers]
    unknown = [l for l in layers if l not in groups and not any(g.startswith(l + ".") for g in groups)]
    if unknown:
        raise TracInError(f"unknown layer name(s) {unknown}; valid names are {list(groups)} "
                          "(or layers=None for all, layers='last' for the final layer).")
    return [n for g, names in groups.items() for n in names
            if any(g == l or g.startswith(l + ".") for l in layers)]


class GradientComputer:
    """Per-example gradients (B, P) of the selected parameters, chunked to bound memory.

    model is never modified: weights come from the checkpoint state through functional_call.
    train_mode=False evaluates in eval mode (dropout off, BatchNorm running stats).
    loss_fn: a name, a function or a Loss (losses.resolve_loss); loss_fn None means classification.
    output_fn: picks the output tensor from what the model returns (calls.model_output).
    device None: the model's device if it is not the CPU, else CUDA when present (devices.resolve_device).
    memory_budget: bytes for one vmap chunk; None takes a quarter of the device's free memory per call.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: str | Callable | Loss | None,
                 layers: str | Sequence[str] | None = None, device: str | torch.device | None = None,
                 train_mode: bool = False, memory_budget: int | None = None, output_fn: OutputFn | None = None):
        self.model = model
        self.loss_fn = resolve_loss(loss_fn)
        self.output_fn = output_fn
        self.device = resolve_device(device, model)
        self.train_mode = train_mode
        self.memory_budget = memory_budget
        self.param_names = select_parameters(model, layers)
        params = dict(model.named_parameters())
        self.shapes = {n: tuple(params[n].shape) for n in self.param_names}
        self.num_params = sum(params[n].numel() for n in self.param_names)
        self.dtype = params[self.param_names[0]].dtype
        self.aliases = set(tied_aliases(model.state_dict()))  # tied weights: one key each (functional_call ties)
        self._model_keys = [k for k in model.state_dict() if k not in self.aliases]
        self._validated = False
        self.check_on_host = self.device.type != "cpu"  # label checks on the CPU batch (tests force it there)
        self._host_targets: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- checkpoint state -------------------------------------------------------------------------
    def prepare(self, state: dict[str, torch.Tensor], name: str = "checkpoint",
                adapter: bool = False) -> dict[str, torch.Tensor]:
        """Check keys/shapes against the model and move the state to the device. adapter: `state` holds a PEFT
        adapter's weights only (checkpoint_formats.adapter_state: the frozen base weights come from the model)."""
        if adapter:
            trainable = {k for k, p in self.model.named_parameters() if p.requires_grad}
            state = adapter_state(state, self.model.state_dict(), trainable, name)
        state = match_keys(state, self.model.state_dict(), name)  # wrapper prefixes, tied weights
        state = {k: v for k, v in state.items() if k not in self.aliases}
        keys = set(state)
        missing = [k for k in self._model_keys if k not in keys]
        unexpected = sorted(keys - set(self._model_keys))
        if missing or unexpected:
            raise TracInError(
                f"{name} does not match the model: missing keys {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}. Save checkpoints of this model's "
                "state_dict() (a dict holding it under 'state_dict' also works).")
        ref = self.model.state_dict()
        bad = [f"{k}: {tuple(state[k].shape)} vs model {tuple(ref[k].shape)}"
               for k in self._model_keys if tuple(state[k].shape) != tuple(ref[k].shape)]
        if bad:
            raise TracInError(f"{name} has tensors of the wrong shape: {bad[:5]}; was it saved from another model?")
        out = {k: state[k].to(self.device) for k in self._model_keys}
        for k, buf in self.model.named_buffers():  # non-persistent buffers are not in a state dict
            if k not in out and k not in self.aliases:
                out[k] = buf.to(self.device)
        return out

    # -- objective --------------------------------------------------------------------------------
    def _objective(self, out: torch.Tensor, y: torch.Tensor | None, target: Target) -> torch.Tensor:
        if isinstance(target, str) and target == "loss":
            val = self.loss_fn(out, y)
        elif isinstance(target, str) and target == "prediction":
            val = self.loss_fn.prediction(out, y)
        elif callable(target):
            val = -target(out)
        else:
            raise TracInError(f"unknown target {target!r}; use 'loss', 'prediction' or a function of the output.")
        if val.numel() != 1:
            raise TracInError(
                f"the {'loss_fn' if target == 'loss' else 'target function'} returned shape "
                f"{tuple(val.shape)} for one example; it must return one value per example "
                "(use reduction='mean' or 'sum', or sum over the non-batch dimensions).")
        return val.reshape(())

    def forward(self, state: dict, x: Any, y: torch.Tensor | None = None) -> torch.Tensor:
        """The model output tensor (B, ...) for inputs x (tensor, tuple or dict; calls.call_model).
        y is passed to the model as labels=... only for losses that need it (seq2seq)."""
        labels = y if self.loss_fn.model_labels and y is not None and not y.is_floating_point() else None
        return call_model(self.model, state, x, self.output_fn, labels)

    def batch(self, inputs: Any, targets: torch.Tensor | None) -> tuple[Any, torch.Tensor | None]:
        """(inputs on the device, floats in the engine's dtype; the loss targets on the device or None).
        The targets are the labels, or derived from the inputs (causal_lm: the input_ids), with
        padding (attention_mask == 0) set to -100 where the loss says so (losses.py)."""
        x = self.cast(inputs)
        y = None if targets is None else targets.to(self.device)
        y = self.loss_fn.targets(x, y)
        self._host_targets = self._on_host(inputs, targets, y)
        return x, y

    def _on_host(self, inputs: Any, targets: torch.Tensor | None, y: torch.Tensor | None):
        """(y, the same targets computed from the CPU batch) when the device is not the CPU and the batch
        came from the CPU, else None. check_outputs then checks the labels' range on the CPU copy: on the
        device that check must read a result back (nonzero: the GPU waits for everything queued), and it
        must happen before the loss runs (an out-of-range class index is a fatal device-side assert)."""
        if y is None or not self.check_on_host:
            return None
        try:
            on_cpu = all(t.device.type == "cpu" for t in tree.leaves(inputs))
        except TracInError:
            return None
        if not on_cpu or (targets is not None and targets.device.type != "cpu"):
            return None
        host = self.loss_fn.targets(inputs, targets)
        return None if host is None else (y, host)

    def check_args(self, y: torch.Tensor | None, target: Target) -> None:
        """Fail early when the objective cannot be formed (no labels)."""
        if isinstance(target, str) and target == "loss" and y is None:
            raise TracInError(self.loss_fn.no_labels())

    def check_outputs(self, out: torch.Tensor, y: torch.Tensor | None, target: Target) -> None:
        """Labels must fit the output (class indices 0..C-1, token ids below the vocabulary size); checked on
        the CPU copy of the batch's targets when batch() kept one (only the output's shape is read)."""
        if isinstance(target, str) and target == "loss":
            host = self._host_targets
            self.loss_fn.check(out, host[1] if host is not None and host[0] is y else y)

    @staticmethod
    def loss_error(exc: Exception, out: torch.Tensor, y: torch.Tensor | None) -> TracInError:
        """A clear error for a loss_fn that raised on the model's output and the targets."""
        ydesc = "None" if y is None else f"dtype {y.dtype}, shape {tuple(y.shape)}"
        return TracInError(
            f"loss_fn failed: {exc}. Model output has shape {tuple(out.shape)}, targets {ydesc}. "
            "For classification pass int64 class indices; for regression float targets shaped like the output.")

    def _check(self, state: dict, x: Any, y: torch.Tensor | None, target: Target) -> None:
        """Run one example eagerly so that bad labels or losses fail with a clear message."""
        self.check_args(y, target)
        y1 = None if y is None else y[:1]
        with torch.no_grad(), model_mode(self.model, self.train_mode):
            out = self.forward(state, tree.take(x, 0, 1), y1)
        self.checked_objectives(out, y1, target)

    # -- gradients --------------------------------------------------------------------------------
    def _split(self, state: dict, names: Sequence[str]) -> tuple[dict, dict]:
        sel = {n: state[n] for n in names}
        rest = {k: v for k, v in state.items() if k not in sel}
        return sel, rest

    def cast(self, x: Any) -> Any:
        """Inputs (tensor, tuple or dict) on the computing device; floating tensors in the engine's dtype."""
        return tree.to_device(x, self.device, self.dtype)

    def per_example(self, state: dict, inputs: Any, targets: torch.Tensor | None,
                    target: Target = "loss", names: Sequence[str] | None = None) -> torch.Tensor:
        """Tensor (B, P): row b is grad_w of the objective of example b at this checkpoint.

        names: restrict to these parameters (default: all selected ones); raises VmapFailed when
        torch.func cannot run the model (the caller may fall back to `reference`). Out-of-memory
        errors pass through unchanged (memory.py: the caller's Backoff halves the batch).
        """
        names = list(self.param_names if names is None else names)
        x, y = self.batch(inputs, targets)
        self._check(state, x, y, target)
        sel, rest = self._split(state, names)
        numel = sum(v.numel() for v in sel.values())

        def one(p, xb, yb):
            y1 = None if yb is None else yb.unsqueeze(0)
            out = self.forward({**rest, **p}, tree.unsqueeze(xb), y1)
            return self._objective(out, y1, target)

        fn = vmap(grad(one), in_dims=(None, 0, None if y is None else 0),
                  randomness="different" if self.train_mode else "error")
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        chunk_bytes = self.memory_budget or budget(self.device, fraction=0.25)
        chunk = max(1, chunk_bytes // (4 * numel * itemsize))
        B = tree.length(x)
        out = None
        with model_mode(self.model, self.train_mode):
            for s in range(0, B, chunk):
                try:
                    with warnings.catch_warnings():      # torch's note on its own missing batching rules (sdpa,
                        warnings.filterwarnings("ignore", message=_SLOW_RULE)   # histc): nothing a user can act on
                        g = fn(sel, tree.take(x, s, s + chunk), None if y is None else y[s:s + chunk])
                except TracInError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    if is_oom(exc):  # memory.py: never wrapped
                        raise
                    raise VmapFailed(
                        f"torch.func could not compute per-example gradients for this model: {exc}. "
                        "A layer may use in-place or data-dependent operations; pass "
                        "per_example='loop' to TracIn to use the slower loop (Hugging Face models: "
                        "also try attn_implementation='eager' in their config).") from exc
                if out is None:
                    out = torch.empty(B, numel, dtype=g[names[0]].dtype, device=self.device)
                pos = 0
                for n in names:
                    k = g[n][0].numel()
                    out[s:s + chunk, pos:pos + k] = g[n].reshape(g[n].shape[0], -1)
                    pos += k
        return out

    def per_example_subset(self, state: dict, inputs: Any, targets: torch.Tensor | None,
                           target: Target, names: Sequence[str]) -> torch.Tensor:
        """(B, sum of numels) per-example gradients of `names` only: vmap, else the loop."""
        try:
            return self.per_example(state, inputs, targets, target, names)
        except VmapFailed:
            return self.reference(state, inputs, targets, target, names)

    def reference(self, state: dict, inputs: Any, targets: torch.Tensor | None,
                  target: Target = "loss", names: Sequence[str] | None = None) -> torch.Tensor:
        """Slow, obviously correct per-example loop: Tensor (B, P). Same objective as per_example."""
        names = list(self.param_names if names is None else names)
        x, y = self.batch(inputs, targets)
        self._check(state, x, y, target)
        rows = []
        with model_mode(self.model, self.train_mode):
            for b in range(tree.length(x)):
                params = {k: v.detach().clone().requires_grad_(k in names) for k, v in state.items()}
                yb = None if y is None else y[b:b + 1]
                out = self.forward(params, tree.take(x, b, b + 1), yb)
                val = self._objective(out, yb, target)
                grads = torch.autograd.grad(val, [params[n] for n in names], allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                                       for n, g in zip(names, grads)]))
        return torch.stack(rows)

    def objectives(self, out: torch.Tensor, y: torch.Tensor | None, target: Target) -> torch.Tensor:
        """Per-example objectives (B,) of a batch output, each computed from its own output row."""
        obj = self._objective
        if out.shape[0] == 1:
            return obj(out, y, target).reshape(1)
        if y is None:
            return vmap(lambda o: obj(o.unsqueeze(0), None, target))(out)
        return vmap(lambda o, t: obj(o.unsqueeze(0), t.unsqueeze(0), target))(out, y)

    def checked_objectives(self, out: torch.Tensor, y: torch.Tensor | None, target: Target) -> torch.Tensor:
        """objectives(), after check_outputs, with a loss_fn failure turned into a clear TracInError."""
        self.check_outputs(out, y, target)
        try:
            return self.objectives(out, y, target)
        except TracInError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise self.loss_error(exc, out, y) from exc

    def output_stats(self, state: dict, inputs: Any, targets: torch.Tensor | None,
                     target: Target = "loss") -> tuple[torch.Tensor, torch.Tensor]:
        """(||dl_b/df_b||^2, l_b): two Tensors (B,) float64, f_b the model output of example b.

        One extra forward pass and a backward to the output only (no parameter gradients), for the
        vmap and loop paths; the hook paths take the same numbers from their own pass
        (HookFeaturizer.many_with_outputs). With train_mode=True this pass draws its own dropout
        masks (so it can differ from the pass behind the features) and runs on copies of the
        buffers (BatchNorm statistics of the checkpoint are left as they are).
        """
        x, y = self.batch(inputs, targets)
        self.check_args(y, target)
        if self.train_mode:
            buffers = {name for name, _ in self.model.named_buffers()}
            state = {k: (v.clone() if k in buffers else v) for k, v in state.items()}
        with model_mode(self.model, self.train_mode), torch.enable_grad():
            out = self.forward(state, x, y).detach().requires_grad_(True)
            losses = self.checked_objectives(out, y, target)
            (g,) = torch.autograd.grad(losses.sum(), out)
        return output_sq_norms(g), losses.detach().double()

    def predictions(self, state: dict, inputs: Any, batch_size: int = 512) -> torch.Tensor:
        """Predicted class (argmax of the output) per example: Tensor (B,) int64."""
        x = self.cast(inputs)
        with torch.no_grad(), model_mode(self.model, False):
            outs = [self.forward(state, tree.take(x, s, s + batch_size))
                    for s in range(0, tree.length(x), batch_size)]
        out = torch.cat(outs)
        if out.dim() > 2:
            raise TracInError(f"predictions() gives one class per example, but this model's output has shape "
                              f"{tuple(out.shape)} (a prediction per position, e.g. a language model's tokens); "
                              "use tracin.outputs(data).argmax(-1) for the predicted token at each position.")
        return out.reshape(out.shape[0], -1).argmax(1)

    def prediction_targets(self, state: dict, inputs: Any, labels: torch.Tensor | None) -> torch.Tensor | None:
        """What target="prediction" attributes, per example of a batch (losses.Loss.predict): the
        predicted class (B,) for classification; token targets (B, T) for language models."""
        x, y = self.batch(inputs, labels)
        with torch.no_grad(), model_mode(self.model, False):
            out = self.forward(state, x, y)
        return self.loss_fn.predict(out, x, y)


def output_sq_norms(g_out: torch.Tensor) -> torch.Tensor:
    """||dl_b/df_b||^2 per example from output gradients (B, ...): Tensor (B,) float64."""
    g = g_out.detach().reshape(g_out.shape[0], -1)
    g = g if g.dtype in (torch.float32, torch.float64) else g.float()
    return torch.linalg.vecdot(g, g).double()


class model_mode:
    """Context: put the model in train/eval mode, restore afterwards."""

    def __init__(self, model: torch.nn.Module, train: bool):
        self.model, self.train = model, train

    def __enter__(self):
        self.was = self.model.training
        if self.was != self.train:
            self.model.train(self.train)

    def __exit__(self, *exc):
        if self.was != self.train:
            self.model.train(self.was)
