"""Mixture-of-experts layers of transformers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, ...): fused expert weights.

transformers stores the E experts of a sparse MoE block as two 3-D parameters (its integrations/moe.py,
`use_experts_implementation`): gate_up_proj (E, 2I, D) and down_proj (E, D, I), called as
experts(x, top_k_index, top_k_weights) on the batch's tokens x (N, D) (the block folds (B, T, D) into
N = B T rows), each token t sent to k experts e with weights w_te. For one (token, expert) slot

    h = W_gu[e] x_t (2I),   a = act(h[:I]) * h[I:] (I),   output_t += w_te W_d[e] a

so, with g_t the gradient of the layer's output at token t, dy = w_te g_t and dh = (da/dh)^T W_d[e]^T dy,
example b's gradients are sums over its slots s = (t, j) routed to e:

    d W_d[e]  = sum_s dy_s a_s^T        d W_gu[e] = sum_s dh_s x_t^T

Each weight is one Kronecker block with the experts stacked as rows, W viewed (E R', C): the row vector
of slot s is one_hot(e_s) (x) r_s (r = dy or dh), the column vector c_s (a or x_t); T = N k / B slots per
example. The slots are sorted by expert once per call (within an expert they stay in example order): exact
rows take one product per (expert, example) range of them, the factored projection projects r_s by expert
e_s's rows of P_r only. dh comes from autograd
through the module's own gate (`_apply_gate`, any activation); h and a are recomputed from x and the
checkpoint's weights kept by the forward hook.

The router (RouterHandler: a module named "...Router" with one (E, D) weight, optionally a bias) returns
(router_logits, scores, indices) with router_logits = x W^T: a Linear whose output is the first element of
a tuple, so its hook reads that element (checked against F.linear on its first call).

Claimed by structure: parameters gate_up_proj (E, 2I, D) and down_proj (E, D, I) and no others, marked by
`use_experts_implementation` as gated, concatenated, not transposed, without biases or post-expert norms
(other layouts take the generic path). Every implementation (eager, grouped_mm, batched_mm) computes the same
function; the hook path's checks compare the rows with the batch gradient and with example 0's own gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import KronHandler, Unsupported, bmm_into
from .linear import LinearHandler
from .registry import register_fallback
from .replaced import check_same_output

_WEIGHTS = ("gate_up_proj", "down_proj")
PAIR_LOOP = 2048   # exact rows: one product per (expert, example) pair up to this many pairs per batch


def _key(*ts: torch.Tensor) -> tuple:
    return tuple((t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) for t in ts)


class _Routing:
    """One call's slots s = (token, j), B examples x S = T k slots: `expert` (B, S) (E: none); `order` (B S,) the
    flat slots expert by expert (stable: example order within an expert); `ranges` [(e, lo, hi)] each expert's
    range in that order (experts with slots only)."""

    def __init__(self, expert: torch.Tensor, E: int):
        self.expert = expert
        flat = expert.reshape(-1)
        self.order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat.clamp(0, E), minlength=E + 1)[:E].tolist()
        self.ranges, lo = [], 0
        for e, n in enumerate(counts):
            if n:
                self.ranges.append((e, lo, lo + n))
            lo += n

    def per_expert(self, width: int, like: torch.Tensor, fn) -> torch.Tensor:
        """(B S, width) in sorted order: rows lo:hi = fn(e, lo, hi) for each expert's range, zeros elsewhere."""
        out = torch.zeros(len(self.order), width, dtype=like.dtype, device=like.device)
        for e, lo, hi in self.ranges:
            out[lo:hi] = fn(e, lo, hi)
        return out

    def unsort(self, rows: torch.Tensor) -> torch.Tensor:
        """(B S, n) in sorted order -> (B, S, n) in slot order."""
        return torch.empty_like(rows).index_copy_(0, self.order, rows).reshape(*self.expert.shape, -1)


class _Slots:
    """Shared by a module's two parts: per call its _Routing and, sorted by expert, the slots' inputs x and gate
    outputs a; per output gradient dy and dh. The latest of each is kept (keyed by the tensors' storage, which
    the cache holds alive, so a key cannot be reused by other data) until the pass is done (ExpertsHandler.done)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.fwd: tuple[tuple, Any] | None = None
        self.bwd: tuple[tuple, Any] | None = None

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        m = self.module
        if hasattr(m, "_apply_gate"):
            return m._apply_gate(h)
        gate, up = h.chunk(2, dim=-1)
        return m.act_fn(gate) * up

    def forward(self, ctx) -> tuple[_Routing, torch.Tensor, torch.Tensor]:
        """(routing, x (B S, D), a (B S, I)), both sorted by expert."""
        x, idx, w, Wgu, Wd = ctx
        key = _key(x, idx, Wgu)
        if self.fwd is None or self.fwd[0] != key:
            B, T, D = x.shape
            k = idx.shape[-1]
            routing = _Routing(idx.reshape(B, T * k), Wgu.shape[0])
            xs = x.unsqueeze(2).expand(B, T, k, D).reshape(-1, D)[routing.order]
            with torch.no_grad():
                a = routing.per_expert(Wd.shape[2], x, lambda e, lo, hi: self.gate(xs[lo:hi] @ Wgu[e].to(x.dtype).T))
            self.fwd = (key, (ctx, routing, xs, a))
        return self.fwd[1][1:]

    def backward(self, ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dy (B S, D), dh (B S, 2I)), sorted by expert, for the output gradient g (B, T, D)."""
        x, idx, w, Wgu, Wd = ctx
        key = _key(x, idx, Wgu, g)
        if self.bwd is None or self.bwd[0] != key:
            routing, xs, _ = self.forward(ctx)
            B, T, D = x.shape
            k = idx.shape[-1]
            g = g.reshape(B, T, D).to(x.dtype)
            dy = (g.unsqueeze(2) * w.reshape(B, T, k, 1).to(x.dtype)).reshape(-1, D)[routing.order]

            def dh(e, lo, hi):
                with torch.enable_grad():
                    h = (xs[lo:hi] @ Wgu[e].to(x.dtype).T).detach().requires_grad_(True)
                    return torch.autograd.grad(self.gate(h), h, dy[lo:hi] @ Wd[e].to(x.dtype))[0]
            self.bwd = (key, ((ctx, g), dy, routing.per_expert(Wgu.shape[1], x, dh)))
        return self.bwd[1][1:]


class ExpertsHandler(KronHandler):
    """One part per weight ("gate_up_proj": r = dh, c = x; "down_proj": r = dy, c = a); ctx = (x (B, T, D),
    top_k_index (B, T, k), top_k_weights (B, T, k), W_gu, W_d) with the checkpoint's weights of the call."""

    covers = _WEIGHTS
    position_wise = True   # acts on each token alone: the block's (B T, D) rows are regrouped (hooks.batch_layouts)

    def __init__(self, module: nn.Module, which: str = "gate_up_proj", slots: _Slots | None = None):
        super().__init__(module)
        self.which = which
        self.slots = slots or _Slots(module)

    @classmethod
    def claims(cls, module: nn.Module) -> bool:
        own = dict(module.named_parameters(recurse=False))
        if set(own) != set(_WEIGHTS) or any(c is not getattr(module, "act_fn", None) for c in module.children()):
            return False
        gu, d = own["gate_up_proj"], own["down_proj"]
        return (gu.dim() == d.dim() == 3 and gu.shape[0] == d.shape[0] and gu.shape[1] == 2 * d.shape[2]
                and gu.shape[2] == d.shape[1] and getattr(module, "has_gate", False) is True
                and getattr(module, "is_concatenated", False) is True and getattr(module, "is_transposed", True) is False
                and getattr(module, "has_bias", True) is False
                and getattr(module, "has_post_expert_norm", False) is False)

    @classmethod
    def covered(cls, module: nn.Module) -> set[str]:
        return set(_WEIGHTS)

    @classmethod
    def parts(cls, module: nn.Module) -> list["ExpertsHandler"]:
        slots = _Slots(module)
        return [cls(module, w, slots) for w in _WEIGHTS]

    def param_locals(self) -> tuple[str, str | None]:
        return self.which, None

    @property
    def has_bias(self) -> bool:
        return False

    def shape(self) -> tuple[int, int]:
        E, R, C = getattr(self.module, self.which).shape
        return E * R, C

    def capture(self, inputs: tuple, output: Any) -> Any:
        x = inputs[0]
        idx = inputs[1] if len(inputs) > 1 else self.kwargs.get("top_k_index")
        w = inputs[2] if len(inputs) > 2 else self.kwargs.get("top_k_weights")
        if not (isinstance(idx, torch.Tensor) and isinstance(w, torch.Tensor) and idx.shape == w.shape):
            raise Unsupported("experts called without (top_k_index, top_k_weights) of one shape")
        B, k = x.shape[0], idx.shape[-1]
        m = self.module
        return (x.detach().reshape(B, -1, x.shape[-1]), idx.reshape(B, -1, k), w.detach().reshape(B, -1, k),
                m.gate_up_proj.detach(), m.down_proj.detach())

    @staticmethod
    def batch_of(ctx: Any) -> int:
        return ctx[0].shape[0]

    def positions(self, ctx, g) -> int:
        return ctx[1].shape[1] * ctx[1].shape[2]

    def _r(self, ctx, g) -> torch.Tensor:
        """(B S, R') row vectors of the slots, sorted by expert."""
        dy, dh = self.slots.backward(ctx, g)
        return dh if self.which == "gate_up_proj" else dy

    def _c(self, ctx) -> tuple[_Routing, torch.Tensor]:
        """(routing, (B S, C) column vectors of the slots sorted by expert)."""
        routing, xs, a = self.slots.forward(ctx)
        return routing, (xs if self.which == "gate_up_proj" else a)

    def cols(self, ctx, g):
        routing, c = self._c(ctx)
        return routing.unsort(c)

    def rows(self, ctx, g):
        """(B, S, E R') dense: slot s's r_s in its expert's rows (memory B S E R': the factored projection and
        the exact rows do not form it)."""
        routing, _ = self._c(ctx)
        r = routing.unsort(self._r(ctx, g))
        E = getattr(self.module, self.which).shape[0]
        out = torch.zeros(*r.shape[:2], E + 1, r.shape[2], dtype=r.dtype, device=r.device)
        out.scatter_(2, routing.expert.clamp(0, E)[..., None, None].expand(*r.shape[:2], 1, r.shape[2]),
                     r.unsqueeze(2))
        return out[:, :, :E].flatten(2)

    def proj_rows(self, ctx, g, P):
        """(B, S, k_r): r_s @ (the rows of P of expert e_s)."""
        routing, _ = self._c(ctx)
        r = self._r(ctx, g).to(P.dtype)
        E, R = getattr(self.module, self.which).shape[:2]
        Pe = P.reshape(E, R, P.shape[1])
        return routing.unsort(routing.per_expert(P.shape[1], P, lambda e, lo, hi: r[lo:hi] @ Pe[e]))

    def grad_into(self, ctx, g, out, accumulate=False):
        """Example b's (R', C) block of expert e: sum over its slots routed to e. The sorted slots list each
        expert's slots example by example, so each (e, b) pair is one contiguous range: one product per pair
        (no padding; up to PAIR_LOOP pairs), else per expert one bmm over the examples' slots padded to the
        most any example has (the flops grow by that max over the mean: 2.7-3.8x measured on Mixtral)."""
        routing, c = self._c(ctx)
        r = self._r(ctx, g)
        E, R, C = getattr(self.module, self.which).shape
        B = routing.expert.shape[0]
        view = out.unflatten(1, (E, R, C))
        if B * E > PAIR_LOOP:
            return self._padded(routing.expert, routing.unsort(r), routing.unsort(c), view, accumulate)
        pair = (routing.expert.clamp(0, E) * B + torch.arange(B, device=out.device).unsqueeze(1)).reshape(-1)
        counts = torch.bincount(pair, minlength=(E + 1) * B)[:E * B].tolist()
        lo = 0
        for p, n in enumerate(counts):
            e, b = divmod(p, B)
            if n:
                rt, cs = r[lo:lo + n].T.to(out.dtype), c[lo:lo + n].to(out.dtype)
                view[b, e].addmm_(rt, cs) if accumulate else torch.mm(rt, cs, out=view[b, e])
            elif not accumulate:
                view[b, e].zero_()
            lo += n

    @staticmethod
    def _padded(expert, r, c, view, accumulate):
        E, R, C = view.shape[1:]
        for e in range(E):
            sel = expert == e
            n = int(sel.sum(1).max())
            if n == 0:
                if not accumulate:
                    view[:, e].zero_()
                continue
            order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :n]          # (B, n)
            keep = sel.gather(1, order).unsqueeze(2).to(r.dtype)
            re = r.gather(1, order.unsqueeze(2).expand(-1, -1, R)) * keep
            ce = c.gather(1, order.unsqueeze(2).expand(-1, -1, C))
            bmm_into(view[:, e], re.transpose(1, 2), ce, accumulate)

    def bias_grad(self, ctx, g):
        raise Unsupported("experts without biases have no bias gradient")

    def done(self) -> None:
        self.slots.fwd = self.slots.bwd = None


class RouterHandler(LinearHandler):
    """A router's logits x W^T (+ b), the first element of its output: a Linear on the batch's tokens."""

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self.verified = False

    @classmethod
    def claims(cls, module: nn.Module) -> bool:
        own = dict(module.named_parameters(recurse=False))
        w, b = own.get("weight"), own.get("bias")
        return (type(module).__name__.lower().endswith("router") and set(own) <= {"weight", "bias"}
                and w is not None and w.dim() == 2 and (b is None or b.shape == w.shape[:1])
                and not any(True for _ in module.children()))

    def attach(self, hook):
        """The hook sees the logits (the output's first element) as the layer's output."""
        def with_kwargs(m, args, kwargs, output):
            self.kwargs = kwargs
            logits = output[0] if isinstance(output, (tuple, list)) else output
            new = hook(m, args, logits)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, (tuple, list)) else new
        return self.module.register_forward_hook(with_kwargs, with_kwargs=True)

    def record(self, inputs, output):
        if not self.verified:
            x, m = inputs[0], self.module
            if not (isinstance(output, torch.Tensor) and isinstance(x, torch.Tensor) and x.shape[-1] == m.weight.shape[1]):
                raise Unsupported(f"{type(m).__name__} does not return its logits first")
            with torch.no_grad():
                mine = F.linear(x.reshape(-1, x.shape[-1]), m.weight, getattr(m, "bias", None))
            if mine.numel() != output.numel():
                raise Unsupported(f"{type(m).__name__} does not return x W^T first")
            check_same_output(m, mine.reshape(output.shape), output, "router logits x W^T")
            self.verified = True
        x = inputs[0]
        return x.detach().reshape(*output.shape[:-1], x.shape[-1]), output


register_fallback(ExpertsHandler)
register_fallback(RouterHandler)
