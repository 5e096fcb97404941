"""EK-FAC curvature of the layers whose handlers give Kronecker factors, fitted over a group of checkpoints.

Vector blocks (norm layers, grouped convolutions, tied weights, and the parameters no handler covers,
such as a ViT's cls_token: generic_curvature.py) are one column each (in' = 1, a = 1): their factor S is
the exact second moment of their pseudo-gradients (the Gauss-Newton block with "gn"), or its diagonal
for blocks of more than VECTOR_DENSE numbers.

Example:
    >>> layers = KronLayers(grads)                                  # grads: GradientComputer
    >>> fit = fit_ekfac(layers, [state0, state1], (X, y))           # ekfac_fit.py: list of LayerCurvature
    >>> mats = layers.to_mats(G)                                    # flat (B, P) -> [(B, out, in')]

Per layer, a per-example gradient is a matrix G (out, in') with in' = in (+1 for the bias, the
last column; Conv2d: in = C k k over unfolded patches). The Gauss-Newton matrix of the mean
training loss, H = 1/N sum_n sum_k vec(G_nk) vec(G_nk)^T (G_nk = J_n^T u_nk, u_nk the columns of
a factor of the output Hessian, H_out = U U^T), is approximated per layer by
    K-FAC:  A (x) S  with  A = E[a a^T] (mean over examples, and positions for Conv2d),
                           S = E[sum_k sum_t g g^T]   (g = output gradients of the layer)
    EK-FAC: (Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T,  Lambda_ij = E_n[sum_k (Q_S^T G_nk Q_A)_ij^2]
with Q_A, Q_S the eigenvectors of A, S averaged over the checkpoints (George et al. 2018). The
eigenvalue correction is the best diagonal in that basis (Frobenius), so EK-FAC is never farther
from the block than K-FAC. The pseudo-gradients u_nk come from output_curvature.py (curvature "gn":
the exact output-Hessian factor, for softmax cross-entropy the true Fisher computed exactly; "mc": one
label per position drawn from the model, unbiased; "empirical": the true labels' gradient; "auto":
"gn" for few outputs, else "mc"). The layers' matrices and curvatures: curvature_blocks.py.
Embeddings are taken transposed (token counts: a diagonal factor), recurrent layers with the time
steps as positions, a layer called several times with its calls' positions side by side.
"""

from __future__ import annotations

from typing import Any, Collection, Sequence

import numpy as np
import torch
from torch import nn

from .. import inputs as tree
from ..data import DataSource
from ..errors import TracInError
from ..gradients.per_example import GradientComputer, model_mode
from ..gradients.hooks import (BATCH_FIRST, FOLDED, batch_layouts, layouts_on_fewer, per_example_copy, probe_batch_ok,
                               read_grad, record_call)
from ..gradients.layers import GENERIC_LIMIT, generic_sizes, plan_blocks
from .curvature_blocks import LayerPlan
from .generic_curvature import GenericPseudoGradients
from .output_curvature import output_factors, resolve_curvature



class KronLayers:
    """The selected parameters of `grads` as layers with Kronecker factors (Linear, Conv, Embedding, recurrent
    layers) and vector blocks (norm layers, grouped convolutions, tied weights, the parameters no handler
    covers up to GENERIC_LIMIT numbers); raises naming the unsupported ones."""

    def __init__(self, grads: GradientComputer, exclude: Collection[str] = ()):
        self.grads = grads
        self.num_params = grads.num_params
        # per-batch products in float64 for a float64 model, else float32 (sums over batches: float64)
        self.work = torch.float64 if grads.dtype == torch.float64 else torch.float32
        self.layouts: dict[str, int] = {}    # plan key -> how its calls hold the batch (hooks.batch_layouts)
        self.settled = False                 # a capture ran: the plans are final (fit_ekfac sizes its sums)
        self._plan(frozenset(exclude))

    def _plan(self, exclude: frozenset[str]) -> None:
        """The plans; the modules in `exclude` (their output does not hold the batch) join the generic block."""
        grads = self.grads
        self.exclude = exclude
        offsets, pos = {}, 0
        for n in grads.param_names:
            offsets[n] = pos
            pos += int(np.prod(grads.shapes[n]))
        self.plans: list[LayerPlan] = []
        self.generic: GenericPseudoGradients | None = None
        bad = []
        for b in plan_blocks(grads.model, grads.param_names, grads.train_mode, exclude=exclude):
            if b.kind == "generic":                  # cls_token, pos_embed, a layer scale: one vector block
                if b.n > GENERIC_LIMIT:
                    bad.append(f"{generic_sizes(grads.model, b)} ({b.n} numbers without a layer handler; limit "
                               f"{GENERIC_LIMIT})")
                    continue
                spans = tuple((offsets[n], int(np.prod(grads.shapes[n]))) for n in b.params)
                self.plans.append(LayerPlan("", grads.model, b.n, 1, False, spans[0][0], None, None, spans,
                                            key=f"<no handler: {', '.join(b.params)}>", generic=True))
                self.generic = GenericPseudoGradients(grads, b.params)
                continue
            h = b.uses[0].handler if b.uses else None
            tied = b.kind == "kron" and len(b.uses) > 1     # one vector block, its uses' gradients summed
            if tied or b.kind == "vector" and len(b.uses) == 1:
                spans = tuple((offsets[n], int(np.prod(grads.shapes[n]))) for n in b.params)
                self.plans.append(LayerPlan(b.uses[0].name, h.module, b.numel, 1, False, spans[0][0], None, h, spans,
                                            tied=tuple(u.handler for u in b.uses) if tied else ()))
                continue
            if b.kind != "kron" or len(b.uses) != 1 or not h.kronecker:
                bad += [f"{u.name or '<model>'} ({type(u.handler.module).__name__})" for u in b.uses] or b.params
                continue
            if h.one_hot_rows:                       # Embedding (V, D), transposed: out = D, in' = V
                self.plans.append(LayerPlan(b.uses[0].name, h.module, b.C, b.R, False, offsets[b.params[0]], None, h,
                                            one_hot=True))
                continue
            self.plans.append(LayerPlan(b.uses[0].name, h.module, b.R, b.C, b.has_bias, offsets[b.params[0]],
                                        offsets[b.params[1]] if b.has_bias else None, h))
        if bad:
            raise TracInError(
                f"SOURCE's EK-FAC curvature supports layers with Kronecker factors (Linear, Conv1d, Conv2d, "
                f"Embedding, recurrent layers), vector blocks (norm layers, grouped convolutions, tied weights) "
                f"and up to {GENERIC_LIMIT} numbers of parameters no layer handler covers; unsupported "
                f"parameters selected: {bad}. Fit the supported layers with TracIn(model, ..., "
                "layers=te.source_layers(model)), or use method='tracin'.")
        names = [p.name for p in self.plans]
        for p in self.plans:                   # an RNN's parts share its module: rnn.weight_ih_l0, rnn.weight_hh_l0, ...
            if not p.generic:
                p.key = p.name if names.count(p.name) == 1 else f"{p.name}.{p.handler.param_locals()[0]}"
        # taps: the handlers whose calls are recorded, one per plan, one per module using a tied weight
        self.taps = {(p.key if not p.tied else f"{p.key}@{j}"): (p, h)
                     for p in self.plans if not p.generic for j, h in enumerate(p.tied or (p.handler,))}

    # -- flat gradients <-> per-layer matrices ------------------------------------------------------
    def to_mats(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """flat (B, P) -> per layer (B, out, in'), bias as the last column."""
        return [p.mat(flat) for p in self.plans]

    def from_mats(self, mats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of to_mats: per layer (B, out, in') -> flat (B, P)."""
        flat = torch.zeros(mats[0].shape[0], self.num_params, dtype=mats[0].dtype, device=mats[0].device)
        for p, M in zip(self.plans, mats):
            p.put(flat, M)
        return flat

    # -- one batch: layer inputs and pseudo output gradients ----------------------------------------
    def capture(self, state: dict, x: Any, y: torch.Tensor | None, curvature: str,
                generator: torch.Generator | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (a (B, T, in'), g (B, K, T, out)) in `work` (float64 for a float64 model, else float32): K
        pseudo-gradients per example."""
        gc = self.grads
        inputs, targets = x, y
        x, y = gc.batch(x, y)
        gc.check_args(y, "loss")
        params = {k: (v.detach().requires_grad_(True) if k in gc.shapes else v) for k, v in state.items()}
        seen: dict[str, list] = {key: [] for key in self.taps}
        B = tree.length(x)
        gen = self.generic
        copies = gen.copies(state, x, y) if gen is not None else {}    # per-example copies (broadcast.py)
        trying = bool(copies) and gen.broadcast is None
        draws = generator.get_state() if trying and generator is not None else None

        def record(key, h, i, o):                      # the call, and how it may hold the batch
            copy = per_example_copy(i[0] if i else None, o, B)   # an output shared by the batch: per-example copies
            if copy is not None:
                i, o = (copy[0], *i[1:]), copy[1]
                copied.append(key)
            options = batch_layouts(h, i, o, B)
            # batch-first for sure: recorded now (a replaced forward keeps only its latest call's (ctx, probe))
            now = record_call(h, i, o, BATCH_FIRST, B) if options == (BATCH_FIRST,) else None
            seen[key].append((i, o, options, now))
            return None if copy is None else o

        copied: list[str] = []                         # taps whose shared output took per-example copies
        failed: Exception | None = None
        handles = [h.attach(lambda m, i, o, key=key, h=h: record(key, h, i, o)) for key, (_, h) in self.taps.items()]
        try:
            with model_mode(gc.model, gc.train_mode), torch.enable_grad():
                out = gc.forward({**params, **copies}, x, y)
        except Exception as exc:
            if copied and not isinstance(exc, TracInError):   # the model needs that output's leading 1 (DeBERTa)
                failed = exc
            elif not trying:
                raise
            out = None                                 # the model does not take the copies: the reference instead
        finally:
            for h in handles:
                h.remove()
        if failed is not None:                         # (after the hooks are gone)
            return self._leave_out(sorted(set(copied)), B,
                                   lambda: self.capture(state, inputs, targets, curvature, generator), failed)
        if out is None:
            gen.broadcast = False
            return self.capture(state, inputs, targets, curvature, generator)
        gc.check_outputs(out, y, "loss")
        ran = {name: c for name, c in seen.items() if c}
        try:
            layouts = self._layouts(state, inputs, targets, {name: c[0][:3] for name, c in ran.items()}, B)
        except _NotPerExample as exc:
            return self._leave_out(exc.names, B, lambda: self.capture(state, inputs, targets, curvature, generator))
        mixed = [name for name, c in ran.items() if any(layouts[name] not in options for _, _, options, _ in c[1:])]
        if mixed:
            raise TracInError(f"layer(s) {sorted(mixed)} hold the batch one way in one call and another way in "
                              "another (batch-first, sequence-first, folded); leave them out with layers=[...].")
        calls = {name: [now if now is not None and layouts[name] == BATCH_FIRST else
                        record_call(self.taps[name][1], i, o, layouts[name], B) for i, o, _, now in c]
                 for name, c in ran.items()}
        bad = [name for name, c in calls.items() if not all(probe_batch_ok(pr, lay, B) for _, pr, lay in c)]
        if bad:
            return self._leave_out(bad, B, lambda: self.capture(state, inputs, targets, curvature, generator))
        U = output_factors(gc.loss_fn, out.detach(), y, curvature, generator)          # (B, K, O)
        outs = [pr for c in calls.values() for _, pr, _ in c]
        per_k = []
        for k in range(U.shape[1]):
            g = torch.autograd.grad(out, outs + list(copies.values()),
                                    grad_outputs=U[:, k].reshape(out.shape).to(out.dtype),
                                    retain_graph=k + 1 < U.shape[1], allow_unused=True)
            per_k.append(g)
        if gen is not None:                                # the generic block's pseudo-gradients (B, K, n)
            got = gen.from_copies([g[len(outs):] for g in per_k], copies) if copies else None
            if got is None or trying:
                ref = gen.reference(state, x, y, U)
                if trying and not gen.settle(got, ref):   # copies act otherwise: this pass may be wrong, redo it
                    if draws is not None:
                        generator.set_state(draws)
                    return self.capture(state, inputs, targets, curvature, generator)
                got = ref
        grads, pos = {}, 0                                 # per layer, per call: its output gradient for each k
        for name, c in calls.items():
            grads[name] = [[g[pos + j] for g in per_k] for j in range(len(c))]
            pos += len(c)
        factors = []
        for p in self.plans:
            if p.generic:                                  # one column: a = 1, g (B, K, 1, n)
                factors.append((torch.ones(B, 1, 1, dtype=self.work, device=got.device),
                                got.to(self.work).unsqueeze(2)))
                continue
            taps = [(h, calls.get(key, []), grads.get(key, [])) for key, (q, h) in self.taps.items() if q is p]
            factors.append(self._tied(p, taps, B, len(per_k)) if p.tied else
                           self._factors(p, taps[0][1], taps[0][2], B, len(per_k)))
        for _, h in self.taps.values():
            h.done()
        self.settled = True
        return factors

    def _leave_out(self, keys: list[str], B: int, redo, failure: Exception | None = None):
        """Layers whose output does not hold the batch (BART's decoder positions: a (1, T, D) table lookup from
        (B, T) ids), or whose shared output the model cannot take per example (`failure`: DeBERTa's relative
        positions) join the generic block, whose pseudo-gradients do not need their outputs per example; then
        `redo` the capture. Only before the first capture has settled the plans; a tied weight's use is refused."""
        mods = {self.taps[k][0].name for k in keys}
        if self.settled or any(self.taps[k][0].tied for k in keys) or "" in mods:
            if failure is not None:
                raise failure
            raise _not_per_example(keys, B)
        self._plan(self.exclude | mods)
        return redo()

    def _tied(self, p: LayerPlan, taps: list, B: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A tied weight as one column: g (B, K, 1, n) its per-example gradient summed over the modules using it
        (each handler's grad_into, as the hook path's block rows), a = 1."""
        dev = self.grads.device
        gs = torch.zeros(B, K, p.out_dim, dtype=self.work, device=dev)
        uses = [(h, c, gk) for h, calls, grads in taps for c, gk in zip(calls, grads)]
        for k in range(K):
            sums = None                                   # every use's gradient added in place (grad_into)
            for h, (ctx, o, lay), gk in uses:
                g = read_grad(o, gk[k], lay, B)
                sums = torch.zeros(B, p.out_dim, dtype=g.dtype, device=dev) if sums is None else sums
                h.grad_into(ctx, g, sums, accumulate=True)
            if sums is not None:
                gs[:, k] = sums
        return torch.ones(B, 1, 1, dtype=self.work, device=dev), gs.unsqueeze(2)

    def _factors(self, p: LayerPlan, calls: list, grads: list, B: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(a (B, T, in'), g (B, K, T, out)) in `work` of one layer from its calls (an Embedding: a = its ids (B, T),
        -1 where nothing is looked up, for the one-hots): a layer called several times
        (a shared encoder, a module in a loop) has the calls' positions side by side (their gradients add up:
        sum over calls and positions of g a^T); one that never ran, zeros (no gradient, no curvature)."""
        dev = self.grads.device
        if not calls:
            return (torch.full((B, 1), -1, dtype=torch.long, device=dev) if p.one_hot else
                    torch.zeros(B, 1, p.cols, dtype=self.work, device=dev),
                    torch.zeros(B, K, 1, p.out_dim, dtype=self.work, device=dev))
        if p.one_hot:                                # ids (B, T) for the one-hots (-1: padding), g = its c_t
            gs = torch.stack([torch.cat([p.handler.cols(ctx, read_grad(o, gk[k], lay, B))
                                         for (ctx, o, lay), gk in zip(calls, grads)], 1) for k in range(K)], 1)
            return torch.cat([p.handler.ids(ctx) for ctx, _, _ in calls], 1), gs.to(self.work)
        if p.vector:                                 # one column: a = 1, g = the block's gradient (B, K, 1, n)
            gs = torch.stack([sum(p.handler.vector(ctx, read_grad(o, gk[k], lay, B))
                                  for (ctx, o, lay), gk in zip(calls, grads)) for k in range(K)], 1)
            return torch.ones(B, 1, 1, dtype=self.work, device=gs.device), gs.to(self.work).unsqueeze(2)
        gs = torch.stack([torch.cat([p.handler.rows(ctx, read_grad(o, gk[k], lay, B))
                                     for (ctx, o, lay), gk in zip(calls, grads)], 1) for k in range(K)], 1)
        a = torch.cat([p.handler.cols(ctx, o) for ctx, o, _ in calls], 1)
        if p.has_bias:
            a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype, device=a.device)], 2)
        return a.to(self.work), gs.to(self.work)

    def _layouts(self, state: dict, inputs: Any, targets: torch.Tensor | None, calls: dict[str, tuple],
                 B: int) -> dict[str, int]:
        """How each layer's call (inputs, output, batch_layouts options) holds the B examples. Where the shapes
        leave it open (T == B, (k B, B, ...)) or show the batch folded into positions, a no-grad forward over
        B - 1 examples tells (hooks.layouts_on_fewer); the answer is kept for later batches. A layer whose
        output does not hold the batch (computed from what all examples share) is refused."""
        if B == 1:
            return {name: options[0] for name, (_, _, options) in calls.items()}
        found, pending = {}, {}
        for name, (_, o, options) in calls.items():
            known = self.layouts.get(name)
            if known in options:
                found[name] = known
            elif len(options) == 1 and options[0] != FOLDED:
                found[name] = self.layouts[name] = options[0]
            else:
                pending[name] = self.taps[name][1]
        if pending and B < 3:
            raise TracInError(f"cannot tell how layer(s) {sorted(pending)} hold a batch of {B} examples (batch-first, "
                              "sequence-first or folded into positions); fit with batches of at least 3 examples.")
        small = layouts_on_fewer(self.grads, state, inputs, targets, pending) if pending else {}
        shared, unknown = [], []
        for name in pending:
            _, o, options = calls[name]
            told, rows = small[name][0] if small[name] else ((), None)
            fits = [lay for lay in options if lay in told
                    and (lay != FOLDED or rows is not None and rows * B == o.shape[0] * (B - 1))]
            if len(fits) == 1:
                found[name] = self.layouts[name] = fits[0]
            else:
                (unknown if fits else shared).append(name)
        if unknown:
            raise TracInError(f"cannot tell how layer(s) {sorted(unknown)} hold the batch (batch-first, sequence-first "
                              f"or folded into positions) from batches of {B} and {B - 1} examples; fit with another "
                              "batch size (batch_size=...).")
        if shared:
            raise _NotPerExample(shared)
        return found

    def output_size(self, state: dict, source: DataSource) -> int:
        """O, the number of outputs per example (one no-grad forward pass over the first example)."""
        gc = self.grads
        _, x, y = next(iter(source.batches(1)))
        x, y = gc.batch(x, y)
        with torch.no_grad(), model_mode(gc.model, gc.train_mode):
            return int(gc.forward(state, x, y)[0].numel())


def source_layers(model: nn.Module, train_mode: bool = False) -> list[str]:
    """Names of the modules whose parameters SOURCE's curvature takes, for TracIn(model, ..., layers=...): the
    layers with Kronecker factors and the vector blocks (norms, grouped convolutions, tied weights);
    embeddings, nn.LSTM / GRU / RNN and their cells included. Left out: parameters no handler covers (which
    SOURCE also takes, as one vector block, up to GENERIC_LIMIT numbers), so this names what to select
    when leaving out a layer SOURCE refuses (one whose output all examples share)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    owners = [n.rpartition(".")[0] for b in plan_blocks(model, names, train_mode)
              if b.kind == "vector" or b.kind == "kron" and (len(b.uses) > 1 or b.uses[0].handler.kronecker)
              for n in b.params]                    # the modules owning the parameters (a tied weight: its first)
    return list(dict.fromkeys(owners))


def choose_curvature(curvature: str, layers: KronLayers, state: dict, source: DataSource) -> str:
    """The curvature to fit (output_curvature.resolve_curvature; "auto" counts the model's outputs per example)."""
    return resolve_curvature(curvature, lambda: layers.output_size(state, source))


class _NotPerExample(Exception):
    """Layers (plan keys) whose output does not hold the batch's examples one by one."""

    def __init__(self, names: list[str]):
        super().__init__(names)
        self.names = names


def _not_per_example(names: list[str], B: int) -> TracInError:
    return TracInError(f"the output of layer(s) {sorted(names)} does not hold the batch's {B} examples one by one "
                       "(computed from something all examples share, such as a position table), so its per-example "
                       "curvature is undefined; leave it out: TracIn(model, ..., layers=[n for n in "
                       f"te.source_layers(model) if n not in {sorted(names)}]).")
