"""Exact per-example gradient features of Linear and Conv2d layers from one batched forward+backward.

Example:
    >>> hf = HookFeaturizer(grads)               # grads: GradientComputer; raises Unsupported otherwise
    >>> rows = hf(state, x, y)                   # (B, hf.layout.dim), exact, see layout.py
    >>> G = hf.expand(rows)                      # (B, P): the flat per-example gradients

With per-example objectives l_b and layer input a_b, output o_b, the output gradient
g_b = dl_b/do_b comes from backpropagating sum_b l_b once (o_b only affects l_b). Then
    Linear:  dW_b = g_b a_b^T (stored as the pair a_b, g_b: an "outer" segment), db_b = g_b
    Conv2d:  dW_b = G_b U_b^T with U_b = unfold(a_b) (C k k, L), G_b (O, L);  db_b = G_b 1
which is the cost of one training step plus small per-layer products (the Captum/Opacus trick,
with Linear gradients never materialized).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import TracInError
from .per_example import GradientComputer, Target, model_mode, output_sq_norms, parameter_groups
from ..store.layout import Layout, Segment


class Unsupported(TracInError):
    """The model (or a layer's input) does not fit the hook path; use vmap instead."""


def conv_supported(m: nn.Conv2d) -> bool:
    """Conv2d layers whose per-example gradients unfold exactly: groups=1, zero padding given as numbers."""
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def selected_layers(grads: GradientComputer) -> Iterator[tuple[str, nn.Module, bool, bool, bool]]:
    """Per layer with selected parameters: (module name, module, has weight, has bias, plain), where
    plain = a Linear or supported Conv2d of which only weight and/or bias are selected."""
    modules = dict(grads.model.named_modules())
    selected = set(grads.param_names)
    for mod_name, names in parameter_groups(grads.model).items():
        sel = [n for n in names if n in selected]
        if not sel:
            continue
        mod = modules[mod_name]
        prefix = f"{mod_name}." if mod_name else ""
        has_w, has_b = prefix + "weight" in sel, prefix + "bias" in sel
        ok_type = isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and conv_supported(mod))
        yield mod_name, mod, has_w, has_b, ok_type and len(sel) == has_w + has_b


class HookFeaturizer:
    """Exact features for models whose selected parameters all sit in Linear or Conv2d layers."""

    def __init__(self, grads: GradientComputer):
        self.grads = grads
        self.plan: list[tuple[str, nn.Module, bool, bool]] = []
        segments, start = [], 0
        for mod_name, mod, has_w, has_b, plain in selected_layers(grads):
            if not plain:
                raise Unsupported(f"layer {mod_name!r} ({type(mod).__name__}) is not a plain Linear/Conv2d")
            if isinstance(mod, nn.Linear) and has_w:
                seg = Segment("outer", start, mod.in_features + has_b, mod.out_features)
            elif isinstance(mod, nn.Linear):
                seg = Segment("dense", start, mod.out_features)
            else:
                k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
                seg = Segment("dense", start, mod.out_channels * (k * has_w + has_b))
            segments.append(seg)
            start += seg.size
            self.plan.append((mod_name, mod, has_w, has_b))
        self.layout = Layout(segments)

    def __call__(self, state: dict, inputs: torch.Tensor, targets: torch.Tensor | None,
                 target: Target = "loss") -> torch.Tensor:
        """Rows (B, layout.dim) for a batch; same objective as GradientComputer.per_example."""
        return self.many([state], inputs, targets, target)[0]

    def many(self, states: list[dict], inputs: torch.Tensor, targets: torch.Tensor | None,
             target: Target = "loss") -> torch.Tensor:
        """Rows (S, B, layout.dim) of one batch at S checkpoints, from a single backward pass."""
        return self.many_with_outputs(states, inputs, targets, target)[0]

    def many_with_outputs(self, states: list[dict], inputs: torch.Tensor, targets: torch.Tensor | None,
                          target: Target = "loss") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows (S, B, layout.dim), ||dl_b/df_b||^2 (S, B) and l_b (S, B) (float64), f_b the output.

        The objectives of different checkpoints share no weights, so backpropagating their sum
        gives each checkpoint's own output gradients (cheaper than S backward calls for queries).
        """
        gc = self.grads
        x = gc.cast(inputs)
        y = None if targets is None else targets.to(gc.device)
        gc.check_args(y, target)
        names = set(gc.param_names)
        seen: dict[str, list] = {name: [] for name, *_ in self.plan}
        handles = [mod.register_forward_hook(lambda m, i, o, n=name: seen[n].append((i[0].detach(), o)))
                   for name, mod, *_ in self.plan]
        model_outs, losses = [], []
        try:
            with model_mode(gc.model, gc.train_mode), torch.enable_grad():
                for state in states:
                    params = {k: (v.detach().requires_grad_(True) if k in names else v) for k, v in state.items()}
                    out = functional_call(gc.model, params, (x,))
                    losses.append(gc.checked_objectives(out, y, target))
                    model_outs.append(out)
        finally:
            for h in handles:
                h.remove()
        if any(len(v) != len(states) for v in seen.values()):
            raise Unsupported("a layer ran more than once per forward pass (shared weights)")
        outs = [o for name, *_ in self.plan for _, o in seen[name]]
        grads = torch.autograd.grad(torch.stack(losses).sum(), outs + model_outs, allow_unused=True)
        gouts = iter(grads[:len(outs)])
        rows: list[list[torch.Tensor]] = [[] for _ in states]
        for name, mod, has_w, has_b in self.plan:
            for s, (a, o) in enumerate(seen[name]):
                g = next(gouts)
                g = torch.zeros_like(o) if g is None else g.detach()
                rows[s].append(self._layer_rows(mod, a, g, has_w, has_b))
        out_sq = torch.stack([output_sq_norms(g) for g in grads[len(outs):]])
        return torch.stack([torch.cat(r, 1) for r in rows]), out_sq, torch.stack(losses).detach().double()

    @staticmethod
    def _layer_rows(mod: nn.Module, a: torch.Tensor, g: torch.Tensor, has_w: bool, has_b: bool) -> torch.Tensor:
        if isinstance(mod, nn.Linear):
            if a.dim() != 2:
                raise Unsupported(f"Linear layer got {a.dim()}-D input (a sequence); its gradient is not rank one")
            if not has_w:
                return g
            ones = torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)
            return torch.cat([torch.cat([a, ones], 1) if has_b else a, g], 1)
        U = F.unfold(a, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (B, Ckk, L)
        G = g.flatten(2)                                                          # (B, O, L)
        parts = []
        if has_w:
            parts.append(torch.bmm(G, U.transpose(1, 2)).flatten(1))
        if has_b:
            parts.append(G.sum(2))
        return torch.cat(parts, 1)

    def expand(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (B, layout.dim) -> flat per-example gradients (B, P) in GradientComputer order."""
        out = []
        for (name, mod, has_w, has_b), seg in zip(self.plan, self.layout.segments):
            r = rows[:, seg.start:seg.start + seg.size]
            if seg.kind == "outer":
                a, g = r[:, :seg.a_dim], r[:, seg.a_dim:]
                full = g.unsqueeze(2) * a.unsqueeze(1)  # (B, out, in [+1])
                out.append(full[:, :, :mod.in_features].flatten(1))
                if has_b:
                    out.append(full[:, :, -1])
            elif isinstance(mod, nn.Conv2d) and has_w and has_b:
                nb = mod.out_channels
                out += [r[:, :-nb], r[:, -nb:]]
            else:
                out.append(r)
        return torch.cat(out, 1)


def build(grads: GradientComputer) -> HookFeaturizer | None:
    """A HookFeaturizer when every selected layer is a plain Linear/Conv2d, else None."""
    try:
        return HookFeaturizer(grads)
    except Unsupported:
        return None

