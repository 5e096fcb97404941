"""Per-example gradients at one checkpoint, flattened over the selected parameters.

Example:
    >>> gc = GradientComputer(model, F.cross_entropy, layers="last")
    >>> state = gc.prepare(checkpoints.load(0))          # validated, on the device
    >>> G = gc.per_example(state, X, y)                  # Tensor (B, P), P = gc.num_params

The objective for one example z = (x, y) at weights w is
    target="loss":        l(w, z) = loss_fn(model(x[None]), y[None])
    target="prediction":  -logit_c(w, x), c = the class the final checkpoint predicts
    target=f (callable):  -f(model(x[None]))      (proponents increase f)
so a positive TracIn score always means "training on z moved the model towards this output".
The fast path is torch.func.vmap over torch.func.grad; `reference` is a slow loop kept for tests.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.func import functional_call, grad, vmap

from ..errors import TracInError

Target = Any  # "loss" | "prediction" | Callable[[Tensor (1, ...)], Tensor (one value)]


def parameter_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Module name -> names of its own trainable parameters, for modules that have any."""
    groups: dict[str, list[str]] = {}
    for mod_name, mod in model.named_modules():
        own = [f"{mod_name}.{p}" if mod_name else p for p, t in mod.named_parameters(recurse=False)
               if t.requires_grad]
        if own:
            groups[mod_name] = own
    return groups


def select_parameters(model: torch.nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    """Parameter names for layers=None (all trainable), "last" (final layer) or module names."""
    groups = parameter_groups(model)
    if not groups:
        raise TracInError("the model has no trainable parameters (requires_grad=True); nothing to attribute.")
    if layers is None:
        return [n for names in groups.values() for n in names]
    if isinstance(layers, str) and layers == "last":
        return groups[list(groups)[-1]]
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
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable | None,
                 layers: str | Sequence[str] | None = None, device: str | torch.device | None = None,
                 train_mode: bool = False, memory_budget: int = 2**28):
        self.model = model
        self.loss_fn = loss_fn
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.train_mode = train_mode
        self.memory_budget = memory_budget
        self.param_names = select_parameters(model, layers)
        params = dict(model.named_parameters())
        self.shapes = {n: tuple(params[n].shape) for n in self.param_names}
        self.num_params = sum(params[n].numel() for n in self.param_names)
        self.dtype = params[self.param_names[0]].dtype
        self._model_keys = list(model.state_dict().keys())
        self._validated = False

    # -- checkpoint state -------------------------------------------------------------------------
    def prepare(self, state: dict[str, torch.Tensor], name: str = "checkpoint") -> dict[str, torch.Tensor]:
        """Check keys/shapes against the model and move the state to the device."""
        keys = set(state)
        if keys != set(self._model_keys) and all(k.startswith("module.") for k in keys):
            state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel/DDP
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
        return {k: state[k].to(self.device) for k in self._model_keys}

    # -- objective --------------------------------------------------------------------------------
    def _objective(self, out: torch.Tensor, y: torch.Tensor | None, target: Target) -> torch.Tensor:
        if isinstance(target, str) and target == "loss":
            val = self.loss_fn(out, y)
        elif isinstance(target, str) and target == "prediction":
            val = -out.reshape(out.shape[0], -1).gather(1, y.reshape(-1, 1).long()).sum()
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

    def _forward(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, state, (x,))

    def check_args(self, y: torch.Tensor | None, target: Target) -> None:
        """Fail early when the objective cannot be formed (no loss_fn, no labels)."""
        if isinstance(target, str) and target == "loss":
            if self.loss_fn is None:
                raise TracInError("no loss_fn was given; pass loss_fn=... to TracIn or use target='prediction'.")
            if y is None:
                raise TracInError("the data has no labels; pass (X, y) or use target='prediction' for unlabeled data.")

    def check_outputs(self, out: torch.Tensor, y: torch.Tensor | None, target: Target) -> None:
        """Class-index labels must lie in 0..C-1 for a (B, C) output; names the bad positions."""
        if y is not None and isinstance(target, str) and target == "loss" and out.dim() == 2 \
                and not y.is_floating_point() and y.dim() == 1:
            bad = ((y < 0) | (y >= out.shape[1])).nonzero().flatten().tolist()
            if bad:
                raise TracInError(f"labels out of range for {out.shape[1]} classes at positions {bad[:10]} "
                                  f"(values {y[bad[:10]].tolist()}); labels must be class indices 0..{out.shape[1] - 1}.")

    @staticmethod
    def loss_error(exc: Exception, out: torch.Tensor, y: torch.Tensor | None) -> TracInError:
        """A clear error for a loss_fn that raised on the model's output and the targets."""
        ydesc = "None" if y is None else f"dtype {y.dtype}, shape {tuple(y.shape)}"
        return TracInError(
            f"loss_fn failed: {exc}. Model output has shape {tuple(out.shape)}, targets {ydesc}. "
            "For classification pass int64 class indices; for regression float targets shaped like the output.")

    def _check(self, state: dict, x: torch.Tensor, y: torch.Tensor | None, target: Target) -> None:
        """Run one example eagerly so that bad labels or losses fail with a clear message."""
        self.check_args(y, target)
        with torch.no_grad(), model_mode(self.model, self.train_mode):
            out = self._forward(state, x[:1])
        self.checked_objectives(out, None if y is None else y[:1], target)

    # -- gradients --------------------------------------------------------------------------------
    def _split(self, state: dict) -> tuple[dict, dict]:
        sel = {n: state[n] for n in self.param_names}
        rest = {k: v for k, v in state.items() if k not in sel}
        return sel, rest

    def cast(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs on the computing device; floating inputs in the engine's dtype."""
        x = x.to(self.device)
        return x.to(self.dtype) if x.is_floating_point() else x

    def per_example(self, state: dict, inputs: torch.Tensor, targets: torch.Tensor | None,
                    target: Target = "loss") -> torch.Tensor:
        """Tensor (B, P): row b is grad_w of the objective of example b at this checkpoint."""
        x = self.cast(inputs)
        y = None if targets is None else targets.to(self.device)
        self._check(state, x, y, target)
        sel, rest = self._split(state)

        def one(p, xb, yb):
            out = functional_call(self.model, {**rest, **p}, (xb.unsqueeze(0),))
            return self._objective(out, None if yb is None else yb.unsqueeze(0), target)

        fn = vmap(grad(one), in_dims=(None, 0, None if y is None else 0),
                  randomness="different" if self.train_mode else "error")
        chunk = max(1, self.memory_budget // (4 * self.num_params * x.element_size()))
        rows = []
        with model_mode(self.model, self.train_mode):
            for s in range(0, x.shape[0], chunk):
                try:
                    g = fn(sel, x[s:s + chunk], None if y is None else y[s:s + chunk])
                except TracInError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise TracInError(
                        f"torch.func could not compute per-example gradients for this model: {exc}. "
                        "A layer may use in-place or data-dependent operations; pass "
                        "per_example='loop' to TracIn to use the slower loop.") from exc
                rows.append(torch.cat([g[n].reshape(g[n].shape[0], -1) for n in self.param_names], 1))
        return torch.cat(rows)

    def reference(self, state: dict, inputs: torch.Tensor, targets: torch.Tensor | None,
                  target: Target = "loss") -> torch.Tensor:
        """Slow, obviously correct per-example loop: Tensor (B, P). Same objective as per_example."""
        x = self.cast(inputs)
        y = None if targets is None else targets.to(self.device)
        self._check(state, x, y, target)
        rows = []
        with model_mode(self.model, self.train_mode):
            for b in range(x.shape[0]):
                params = {k: v.detach().clone().requires_grad_(k in self.shapes) for k, v in state.items()}
                out = functional_call(self.model, params, (x[b:b + 1],))
                val = self._objective(out, None if y is None else y[b:b + 1], target)
                grads = torch.autograd.grad(val, [params[n] for n in self.param_names], allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                                       for n, g in zip(self.param_names, grads)]))
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

    def output_stats(self, state: dict, inputs: torch.Tensor, targets: torch.Tensor | None,
                     target: Target = "loss") -> tuple[torch.Tensor, torch.Tensor]:
        """(||dl_b/df_b||^2, l_b): two Tensors (B,) float64, f_b the model output of example b.

        One extra forward pass and a backward to the output only (no parameter gradients), for the
        vmap and loop paths; the hook paths take the same numbers from their own pass
        (HookFeaturizer.many_with_outputs). With train_mode=True this pass draws its own dropout
        masks (so it can differ from the pass behind the features) and runs on copies of the
        buffers (BatchNorm statistics of the checkpoint are left as they are).
        """
        x = self.cast(inputs)
        y = None if targets is None else targets.to(self.device)
        self.check_args(y, target)
        if self.train_mode:
            buffers = {name for name, _ in self.model.named_buffers()}
            state = {k: (v.clone() if k in buffers else v) for k, v in state.items()}
        with model_mode(self.model, self.train_mode), torch.enable_grad():
            out = self._forward(state, x).detach().requires_grad_(True)
            losses = self.checked_objectives(out, y, target)
            (g,) = torch.autograd.grad(losses.sum(), out)
        return output_sq_norms(g), losses.detach().double()

    def predictions(self, state: dict, inputs: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted class (argmax of the output) per example: Tensor (B,) int64."""
        x = self.cast(inputs)
        with torch.no_grad(), model_mode(self.model, False):
            outs = [self._forward(state, x[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)]
        out = torch.cat(outs)
        return out.reshape(out.shape[0], -1).argmax(1)


def output_sq_norms(g_out: torch.Tensor) -> torch.Tensor:
    """||dl_b/df_b||^2 per example from output gradients (B, ...): Tensor (B,) float64."""
    return g_out.detach().double().reshape(g_out.shape[0], -1).pow(2).sum(1)


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
