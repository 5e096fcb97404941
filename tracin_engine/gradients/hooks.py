"""Exact per-example gradient features from one batched forward+backward, by layer handlers.

Example:
    >>> hf = HookFeaturizer(grads)               # grads: GradientComputer; raises Unsupported otherwise
    >>> rows = hf(state, x, y)                   # (B, hf.layout.dim), exact, see layout.py
    >>> G = hf.expand(rows)                      # (B, P): the flat per-example gradients

With per-example objectives l_b and each handled layer's output o_b, the output gradient
g_b = dl_b/do_b comes from backpropagating sum_b l_b once (o_b only affects l_b). Each block of
layers.py then turns (what its modules' forward hooks saw, g) into per-example gradients
(handlers/base.py): a Linear on 2-D input is stored as the pair (a_b, g_b) (an "outer" segment),
other kron blocks as dW_b = sum_t r_bt c_bt^T, norm layers as their exact vectors, and parameters
no handler covers through the vmap/loop path restricted to them. This costs one training step plus
small per-layer products (the Opacus trick, with rank-one Linear gradients never materialized).

The first batch settles the layout (which Linear layers see sequences, sequence-first or folded into
the batch: batch_layouts) and checks that the per-example gradients add up to the batch gradient of every
handled parameter: a block whose weight is also used outside its module (F.linear(x, self.emb.weight))
fails it, and its modules go generic (GenericLayers: the featurizer rebuilds this path without them);
then that example 0's rows equal its own gradient: a layer mixing examples fails that (Unsupported), and
the featurizer falls back to vmap.
"""

from __future__ import annotations

import math
from typing import Any, Collection

import torch
from torch.utils._pytree import tree_map

from .. import inputs as tree
from ..buffers import empty_output
from ..devices import TF32_UNIT_ROUNDOFF, tf32_enabled
from .broadcast import agrees, broadcast_copy, find_lead
from .handlers import GenericLayers, SharedInput, Unsupported
from .layers import GENERIC_LIMIT, Block, Use, generic_sizes, plan_blocks
from .per_example import GradientComputer, Target, model_mode, output_sq_norms
from ..store.layout import Layout, Segment

__all__ = ["GenericLayers", "HookFeaturizer", "SharedInput", "Unsupported", "batch_layouts", "build"]

Contribution = tuple[Any, Any, torch.Tensor]   # (handler, captured ctx, output gradient g)


class HookFeaturizer:
    """Exact features for models whose selected parameters the handlers cover (small rest: generic)."""

    low_rank_rows = True   # store few-position convolutions as factor pairs (FactoredProjection: False)

    def __init__(self, grads: GradientComputer, generic_limit: int = GENERIC_LIMIT, exclude: Collection[str] = ()):
        self.grads = grads
        self.exclude = frozenset(exclude)    # modules left to the generic path (GenericLayers)
        self.blocks: list[Block] = plan_blocks(grads.model, grads.param_names, grads.train_mode, exclude=exclude)
        self.generic = next((b for b in self.blocks if b.kind == "generic"), None)
        if self.generic is not None and (self.generic.n > generic_limit or len(self.blocks) == 1):
            raise Unsupported(f"no layer handler covers {generic_sizes(grads.model, self.generic)} "
                              f"({self.generic.n} numbers per example; limit {generic_limit})")
        params = dict(grads.model.named_parameters())
        self.offsets, pos = {}, 0
        for n in grads.param_names:
            self.offsets[n] = pos
            pos += params[n].numel()
        self.frozen = False
        self.grad_dtype: torch.dtype | None = None   # the dtype of the model's output gradients (check_tolerance)
        self.rounded_in: torch.dtype | None = None   # float32 when a float64 model's layer computes in float32
        self.layouts: dict[int, int] = {}    # id(use) -> its batch layout where the shapes told (_layout)
        self.guessed: dict[int, int] = {}    # id(use) -> the layout this pass guessed (_settle_layouts)
        self.folded_rows: dict[int, list] = {}   # id(use) -> leading sizes of its folded calls this pass
        # generic parameters of leading size 1 (cls_token (1, 1, D), pos_embed (1, N, D)) are usually
        # broadcast over the batch: substituted by a per-example copy (B, ...) in the batched pass, their
        # gradients are per example. So are 1-D ones used as elementwise scales or shifts (ConvNeXt's layer
        # scale on (B, H, W, C)), as copies (B, 1, .., 1, C) with `lead` ones, found on the first batch
        # (broadcast.find_lead). Checked against vmap on the first batch (None: not yet known).
        self.broadcast: bool | None = None if self.generic is not None and all(
            grads.shapes[n][:1] == (1,) or len(grads.shapes[n]) == 1 for n in self.generic.params) else False
        self.lead: int | None = None
        self.relayout()

    # -- layout -------------------------------------------------------------------------------------
    def segment(self, i: int, b: Block, start: int) -> Segment:
        """Block i's segment of an exact row."""
        if b.kind == "kron" and b.outer:
            return Segment("outer", start, b.a_dim, b.R)
        if b.kind == "kron" and b.rank:
            return Segment("lowrank", start, b.a_dim, b.R, b.rank)
        return Segment("dense", start, b.numel)

    def relayout(self) -> None:
        segments, start = [], 0
        for i, b in enumerate(self.blocks):
            seg = self.segment(i, b, start)
            segments.append(seg)
            start += seg.size
        self.segments = segments
        self.layout = Layout(segments)

    def adopt_layout(self, stored: list[list]) -> None:
        """Take the rank-one choices of a stored layout (Layout.to_dict()) instead of settling them on a
        first batch, so a reopened index and this featurizer agree; a layout of another model is left
        alone (the metadata check then reports the difference)."""
        if len(stored) != len(self.blocks):
            return
        for b, seg in zip(self.blocks, stored):
            if b.kind == "kron" and len(b.uses) == 1:
                b.outer = seg[0] == "outer"
                b.rank = int(seg[4]) if seg[0] == "lowrank" and self.low_rank_rows else 0
        self.relayout()
        self.frozen = True

    def _settle(self, calls: dict[int, list], S: int) -> None:
        """Choose outer (rank one), lowrank or dense for each kron block from the first batch; later batches
        must fit. Lowrank (exact rows only): a layer with a fixed number T of positions per example (a
        convolution, a Linear on a grid of positions: ConvNeXt's pointwise layers on (B, H, W, C)) whose
        T (C + R) factor numbers are at most half its R C weights and whose scoring cost T^2 (C + R) is at
        most 4 R C (ResNet-18's 4x4 layers: 29x smaller, cheaper to score)."""
        changed = False
        for b in self.blocks:
            if b.kind != "kron":
                continue
            n_calls = sum(len(calls[id(u)]) for u in b.uses)
            u0 = b.uses[0]
            T = {u0.handler.positions(ctx, g) for ctx, g in calls[id(u0)]}
            rank_one = n_calls == S and getattr(u0.handler, "rank_one_hint", False) and T == {1}
            rank, ab = 0, b.a_dim + b.R
            if self.low_rank_rows and n_calls == S and len(b.uses) == 1 and not rank_one and len(T) == 1 \
                    and all(u0.handler.fixed_positions(ctx) for ctx, _ in calls[id(u0)]):
                t = next(iter(T))
                rank = t if 2 * t * ab <= b.R * b.a_dim and t * t * ab <= 4 * b.R * b.a_dim else 0
            if self.frozen and b.rank and T != {b.rank}:
                raise Unsupported(f"layer {b.describe()} now has {sorted(T)} positions per example, not the "
                                  f"{b.rank} of the first batch (inputs of another size); the row layout is fixed")
            if rank_one != b.outer or (rank != b.rank and not self.frozen):
                if self.frozen and not rank_one:
                    raise Unsupported(f"layer {b.describe()} now sees several positions per example; the "
                                      "row layout was fixed on the first batch (rank one)")
                if not self.frozen:
                    b.outer, b.rank, changed = rank_one, rank, True
        if changed:
            self.relayout()
        self.frozen = True

    # -- one batched pass ---------------------------------------------------------------------------
    def __call__(self, state: dict, inputs: Any, targets: torch.Tensor | None,
                 target: Target = "loss") -> torch.Tensor:
        """Rows (B, layout.dim) for a batch; same objective as GradientComputer.per_example."""
        return self.many([state], inputs, targets, target)[0]

    def many(self, states: list[dict], inputs: Any, targets: torch.Tensor | None,
             target: Target = "loss") -> torch.Tensor:
        """Rows (S, B, layout.dim) of one batch at S checkpoints, from a single backward pass."""
        return self.many_with_outputs(states, inputs, targets, target)[0]

    def many_with_outputs(self, states: list[dict], inputs: Any, targets: torch.Tensor | None,
                          target: Target = "loss", rows_out: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows (S, B, layout.dim), ||dl_b/df_b||^2 (S, B) and l_b (S, B) (float64), f_b the output.

        The objectives of different checkpoints share no weights, so backpropagating their sum
        gives each checkpoint's own output gradients (cheaper than S backward calls for queries).
        rows_out: a contiguous (S, B, layout.dim) buffer of the rows' dtype and device to write the rows
        into (a caller that stores each batch before the next reuses one buffer: no fresh memory to
        fault in per batch); the rows are then `rows_out`. Any other buffer is not used.
        """
        gc = self.grads
        x, y = gc.batch(inputs, targets)
        gc.check_args(y, target)
        names = set(gc.param_names)
        uses = [u for b in self.blocks for u in b.uses]
        seen: dict[int, list] = {id(u): [] for u in uses}

        B = tree.length(x)

        def hook(u):
            def record(m, i, o):
                layout = self._layout(u, i, o, B)
                try:
                    if layout != BATCH_FIRST:                # (T, B, ...), (B k, ...): the handler sees (B, ...)
                        seen[id(u)].append(record_call(u.handler, i, o, layout, B))
                        return None
                    ctx, o = u.handler.record(i, o)
                except Unsupported:
                    raise
                except Exception as exc:                     # a layer computing something its handler cannot
                    raise Unsupported(f"the handler of layer {u.name!r} ({type(m).__name__}) cannot take its "
                                      f"input ({type(exc).__name__}: {exc})") from exc
                copy = per_example_copy(ctx, o, B)
                if copy is not None:
                    ctx, o = copy
                    copied.append(u.name)
                seen[id(u)].append((ctx, o, 0))
                return None if copy is None else o
            return record

        if self.broadcast is None and self.lead is None:
            self.lead = find_lead(gc, self.generic.params, states[-1], x, y, target)
            if self.lead is None:
                self.broadcast = False                 # no copy shape reproduces the model: vmap instead
        self.guessed, self.folded_rows = {}, {}
        copied: list[str] = []                           # layers whose shared output took per-example copies
        handles = [u.handler.attach(hook(u)) for u in uses]
        model_outs, losses, plist, batched = [], [], [], []
        bcast = set(self.generic.params) if self.broadcast is not False and self.generic is not None else set()
        trying = self.broadcast is None
        try:
            with model_mode(gc.model, gc.train_mode), torch.enable_grad():
                for state in states:
                    params = {k: (v.detach().requires_grad_(True) if k in names else v) for k, v in state.items()}
                    copies = {k: broadcast_copy(params[k].detach(), B, self.lead or 0).requires_grad_(True)
                              for k in bcast}
                    out = gc.forward({**params, **copies}, x, y)
                    losses.append(gc.checked_objectives(out, y, target))
                    model_outs.append(out)
                    plist.append(params)
                    batched.append(copies)
        except Exception as exc:
            if copied and not isinstance(exc, Unsupported):
                # the model needs that output's leading 1 (DeBERTa repeats its relative-position projections
                # to the batch size): those layers go generic (the featurizer rebuilds the path)
                names = sorted(set(copied))
                raise SharedInput(f"the model fails when the output of {', '.join(names)}, which all examples "
                                  f"share, is given per example ({type(exc).__name__}: {exc})", names) from exc
            if not bcast or self.broadcast is not None:
                raise
            self.broadcast = False                     # the model does not broadcast them: vmap instead
            return self.many_with_outputs(states, inputs, targets, target, rows_out)
        finally:
            for h in handles:
                h.remove()
        S = len(states)
        for b in self.blocks:
            for u in b.uses:
                k = len(seen[id(u)])
                if k % S:  # k == 0: not called (an unused head has zero gradients; a direct use fails the check)
                    raise Unsupported(f"layer {u.name!r} ({type(u.handler.module).__name__}) ran {k} times for "
                                      f"{S} checkpoints")
                for ctx, o, layout in seen[id(u)]:
                    if u.handler.batch_of(ctx) != B or not probe_batch_ok(o, layout, B):
                        raise Unsupported(f"layer {u.name!r} saw a leading dimension of {o.shape[0]}, not the "
                                          f"batch size {B} (inputs reshaped across examples)")
        if self.guessed and self._settle_layouts(states[0], inputs, targets, [u for u in uses if id(u) in self.guessed]):
            return self.many_with_outputs(states, inputs, targets, target, rows_out)   # a guess was wrong: redo
        outs = [o for u in uses for _, o, _ in seen[id(u)]]
        check = not self.frozen
        handled = [n for b in self.blocks if b.kind != "generic" for n in b.params]
        copies = [c[n] for c in batched for n in sorted(bcast)]
        wrt = outs + model_outs + ([p[n] for p in plist for n in handled] if check else []) + copies
        grads = torch.autograd.grad(torch.stack(losses).sum(), wrt, allow_unused=True)
        per_copy = dict(zip(map(id, copies), grads[len(grads) - len(copies):]))
        g_iter = iter(grads[:len(outs)])
        calls: dict[int, list] = {}
        for u in uses:
            calls[id(u)] = []
            for ctx, o, layout in seen[id(u)]:
                calls[id(u)].append((ctx, read_grad(o, next(g_iter), layout, B).detach()))
        self.grad_dtype = next((c[0][1].dtype for c in calls.values() if c), gc.dtype)   # (a module may not run)
        if self.grad_dtype == torch.float64 and any(u.handler.computes_in == torch.float32 for u in uses):
            self.rounded_in = torch.float32    # a layer computing in float32 (Gemma's norms): checks at its precision
        if self.grad_dtype in (torch.bfloat16, torch.float16):
            # a half-precision model: its layers' inputs and output gradients as it rounded them, the
            # per-example products, sums and norms in float32 (rows float32)
            calls = {k: [(tree_map(_single, ctx), g.float()) for ctx, g in v] for k, v in calls.items()}
        self._settle(calls, S)
        dtype = self.grad_dtype if self.grad_dtype in (torch.float32, torch.float64) else torch.float32
        shape = (S, B, self.layout.dim)
        fits = (rows_out is not None and tuple(rows_out.shape) == shape and rows_out.dtype == dtype
                and rows_out.device == gc.device and rows_out.is_contiguous())
        rows = rows_out if fits else empty_output(shape, dtype, gc.device)
        try:
            for s in range(S):
                for i, (b, seg) in enumerate(zip(self.blocks, self.segments)):
                    out = rows[s, :, seg.start:seg.start + seg.size]
                    if b.kind == "generic":
                        self.generic_rows(i, b, self._generic(states[s], x, y, target, batched[s], per_copy), out)
                        continue
                    contrib = []
                    for u in b.uses:
                        k = len(calls[id(u)]) // S
                        contrib += [(u.handler, ctx, g) for ctx, g in calls[id(u)][s * k:(s + 1) * k]]
                    if not contrib:
                        out.zero_()
                        continue
                    self.block_rows(i, b, contrib, out)
        finally:
            for u in uses:
                u.handler.done()
        if check:
            full = grads[len(outs) + len(model_outs):len(grads) - len(copies)]
            self._check_sums(rows, full, handled, plist)
        if bcast and trying:
            if self.broadcast:                         # the copies must not have changed the objectives
                with torch.no_grad(), model_mode(gc.model, gc.train_mode):
                    plain = gc.objectives(gc.forward(states[-1], x, y), y, target)
                self.broadcast = bool(torch.allclose(plain, losses[-1].detach(), rtol=1e-4, atol=1e-6))
            if not self.broadcast:                     # that pass ran with wrong copies: redo it without
                self.frozen = False
                return self.many_with_outputs(states, inputs, targets, target, rows_out)
        if check:                                      # (after the copies' check: a wrong pass is redone above)
            self._check_example(rows, states[0], inputs, targets, target, handled)
        out_sq = torch.stack([output_sq_norms(g) for g in grads[len(outs):len(outs) + len(model_outs)]])
        return rows, out_sq, torch.stack(losses).detach().double()

    def _layout(self, u: Use, inputs: tuple, output: Any, B: int) -> int:
        """How this call of use u holds the batch (batch_layouts). Where the shapes cannot tell, the layer's
        earlier calls decide, else the likelier layout (a first batch: the check of example 0 against its
        own gradient refuses a wrong guess); a layer that changes is refused."""
        options = batch_layouts(u.handler, inputs, output, B)
        if B == 1:
            return options[0]                          # (one example tells nothing about the layout)
        known = self.layouts.get(id(u))
        if len(options) > 1:
            if known in options:
                return known
            self.guessed[id(u)] = options[0]
            return options[0]
        if known is not None and known != options[0]:
            raise Unsupported(f"layer {u.name!r} held the batch one way on one batch and another way on another "
                              f"(batch-first, sequence-first or folded into its positions)")
        if known is None and options[0] == FOLDED:
            self.guessed[id(u)] = FOLDED               # first seen folded: confirmed by _settle_layouts
        if options[0] == FOLDED:
            self.folded_rows.setdefault(id(u), []).append(output.shape[0])
        self.layouts[id(u)] = options[0]
        return options[0]

    def _settle_layouts(self, state: dict, inputs: Any, targets: torch.Tensor | None, guessed: list[Use]) -> bool:
        """Tell the layouts this pass guessed from a forward pass over the batch's first B - 1 examples: where
        the shapes left them open (T == B, (k B, B, ...)) they differ there (B - 1 >= 2); a layer first seen
        folded ((k B, ...)) must then hold k (B - 1) rows, else its input is shared by the batch (T5's
        relative position buckets): SharedInput. True when a guess of this pass was wrong."""
        B = tree.length(inputs)
        if B < 2:
            return False
        shapes = layouts_on_fewer(self.grads, state, inputs, targets, {id(u): u.handler for u in guessed})
        wrong, shared = False, []
        for u in guessed:
            if self.guessed[id(u)] == FOLDED and self.layouts.get(id(u)) == FOLDED:
                rows = self.folded_rows.get(id(u), [])
                if any(n is not None and n * B != k * (B - 1) for (_, n), k in zip(shapes[id(u)], rows)):
                    shared.append(u.name)
                continue
            told = {o[0] for o, _ in shapes[id(u)] if len(o) == 1} if B - 1 >= 2 else set()
            if len(told) == 1:
                self.layouts[id(u)] = told.pop()
                wrong |= self.layouts[id(u)] != self.guessed[id(u)]
        if shared:
            raise SharedInput(f"the input of {', '.join(shared)} does not hold the batch (its leading size does not "
                              "follow the number of examples: computed from something all examples share)", shared)
        return wrong

    # -- per block ----------------------------------------------------------------------------------
    def block_rows(self, i: int, b: Block, contrib: list[Contribution], out: torch.Tensor) -> None:
        """Write block i's exact rows (B, segment size) into `out`."""
        if b.kind == "vector":
            h, ctx, g = contrib[0]
            out.copy_(h.vector(ctx, g))
            for h, ctx, g in contrib[1:]:
                out.add_(h.vector(ctx, g))
            return
        if b.outer:
            h, ctx, g = contrib[0]
            out[:, :b.C] = h.cols(ctx, g)[:, 0]
            if b.has_bias:
                out[:, b.C] = 1
            out[:, b.a_dim:] = h.rows(ctx, g)[:, 0]
            return
        if b.rank:
            h, ctx, g = contrib[0]
            a, r = _pairs(b, out)                                                  # views of the rows
            a[:, :, :b.C] = h.cols(ctx, g)
            if b.has_bias:
                a[:, :, b.C] = 1
            r.copy_(h.rows(ctx, g))
            return
        nw = b.R * b.C
        # each use writes (the first) or adds (the rest) its gradients in place in the rows; sparse
        # uses (an Embedding tied to a Linear head) go last, so the dense one overwrites without a zero-fill
        contrib = sorted(contrib, key=lambda c: bool(getattr(c[0], "sparse_grad", False)))
        for j, (h, ctx, g) in enumerate(contrib):
            h.grad_into(ctx, g, out[:, :nw], accumulate=j > 0)
            if b.has_bias:
                bg = h.bias_grad(ctx, g)
                out[:, nw:].copy_(bg) if j == 0 else out[:, nw:].add_(bg)

    def _generic(self, state: dict, x: torch.Tensor, y: torch.Tensor | None, target: Target, copies: dict,
                 per_copy: dict) -> torch.Tensor:
        """(B, n) exact per-example gradients of the generic block: from the per-example copies when the
        model broadcasts them (checked against vmap/loop on the first batch), else vmap/loop."""
        names = self.generic.params
        if copies:
            got = torch.cat([(torch.zeros_like(copies[n]) if per_copy[id(copies[n])] is None
                              else per_copy[id(copies[n])]).reshape(tree.length(x), -1) for n in names], 1)
            if self.broadcast:
                return got
        ref = self.grads.per_example_subset(state, x, y, target, names)
        if copies and self.broadcast is None:
            self.broadcast = agrees(got, ref)
        return ref

    def generic_rows(self, i: int, b: Block, flat: torch.Tensor, out: torch.Tensor) -> None:
        """Write the generic block's rows from its exact per-example gradients flat (B, n)."""
        out.copy_(flat)

    # -- checks and the slow expansion --------------------------------------------------------------
    def _check_sums(self, rows: torch.Tensor, full: tuple, handled: list[str], plist: list[dict]) -> None:
        """sum_b of the per-example rows must equal the batch gradient, block by block; the blocks that do not
        (a weight also used outside its layer's forward) go generic (GenericLayers)."""
        tol = check_tolerance(rows, self.grad_dtype, self.rounded_in)
        k, bad = 0, {}
        for s in range(rows.shape[0]):
            per = self.block_sums(rows[s])
            for b, got in zip(self.blocks, per):
                if b.kind == "generic":
                    continue
                ref = [full[k + j] for j in range(len(b.params))]
                k += len(b.params)
                ref = [torch.zeros_like(plist[s][n]) if r is None else r for r, n in zip(ref, b.params)]
                want = self.block_reference(b, [r.detach().reshape(-1).to(got.dtype) for r in ref])
                err = (got - want).norm()
                if not err <= tol * want.norm() + 1e-30:
                    bad[b.describe()] = (b, float(err / (want.norm() + 1e-30)))
        if bad:
            raise GenericLayers(
                "per-example gradients of " + ", ".join(f"{d} (relative error {e:.2g})" for d, (_, e) in bad.items())
                + " do not add up to the batch gradient: a parameter is used outside its layer's forward",
                sorted({u.name for b, _ in bad.values() for u in b.uses}))

    def _check_example(self, rows: torch.Tensor, state: dict, inputs: Any, targets: torch.Tensor | None,
                       target: Target, handled: list[str]) -> None:
        """Example 0's rows (first checkpoint) must equal its own gradient, from a pass over it alone (the
        loop's: one example's forward and backward), block by block. Sums over the batch can agree while
        each example's share is wrong: a layer whose input is sequence-first (T, B, ...) with T equal to
        the batch size looks batch-first, a layer that mixes examples. Not in train mode (dropout draws
        differ between the passes) nor for one example (the sum check covered it)."""
        gc = self.grads
        if rows.shape[1] < 2 or gc.train_mode or not handled:
            return
        flat = gc.reference(state, tree.take(inputs, 0, 1), None if targets is None else targets[:1], target,
                            handled)[0]
        own = dict(zip(handled, flat.split([self._numel(n) for n in handled])))
        tol = check_tolerance(rows, self.grad_dtype, self.rounded_in)
        for b, got in zip(self.blocks, self.block_sums(rows[0, :1])):
            if b.kind == "generic":
                continue
            want = self.block_reference(b, [own[n].detach().reshape(-1).to(got.dtype) for n in b.params])
            err = (got - want).norm()
            if not err <= tol * want.norm() + 1e-30:
                raise Unsupported(
                    f"the gradient of example 0 alone differs from its per-example gradient of {b.describe()} in "
                    f"the batch (relative error {float(err / (want.norm() + 1e-30)):.2g}): the layer's input is "
                    "not batch-first (a sequence-first model; batch_first=True avoids this) or folds the batch "
                    "into its positions in another order, or the layer mixes the examples of a batch")

    def block_sums(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Per block, the sum over examples of what its rows represent (flat, parameter order)."""
        flat = self.expand(rows).sum(0, keepdim=True)
        return [torch.cat([flat[0, self.offsets[n]:self.offsets[n] + self._numel(n)] for n in b.params])
                for b in self.blocks]

    def block_reference(self, b: Block, grads: list[torch.Tensor]) -> torch.Tensor:
        """What block_sums should equal, from the batch gradients of the block's parameters."""
        return torch.cat(grads)

    def _numel(self, name: str) -> int:
        return math.prod(self.grads.shapes[name])

    def expand(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows (B, layout.dim) -> flat per-example gradients (B, P) in GradientComputer order."""
        flat = torch.empty(rows.shape[0], self.grads.num_params, dtype=rows.dtype, device=rows.device)
        for b, seg in zip(self.blocks, self.segments):
            r = rows[:, seg.start:seg.start + seg.size]
            if b.kind == "kron":
                h = b.uses[0].handler
                if b.rank:
                    a, g = _pairs(b, r)
                    full = torch.bmm(g.transpose(1, 2), a)                               # (B, R, C [+1])
                    w, bias = h.to_params(full[:, :, :b.C]), full[:, :, b.C] if b.has_bias else None
                elif b.outer:
                    full = r[:, b.a_dim:].unsqueeze(2) * r[:, :b.a_dim].unsqueeze(1)   # (B, R, C [+1])
                    w, bias = h.to_params(full[:, :, :b.C]), full[:, :, b.C] if b.has_bias else None
                else:
                    nw = b.R * b.C
                    w, bias = r[:, :nw], r[:, nw:] if b.has_bias else None
                self._put(flat, b.params[0], w)
                if bias is not None:
                    self._put(flat, b.params[1], bias)
            else:
                pos = 0
                for n in b.params:
                    k = self._numel(n)
                    self._put(flat, n, r[:, pos:pos + k])
                    pos += k
        return flat

    def _put(self, flat: torch.Tensor, name: str, values: torch.Tensor) -> None:
        o = self.offsets[name]
        flat[:, o:o + values.shape[1]] = values


def _pairs(b: Block, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A lowrank block's (c (B, T, C [+1]), r (B, T, R)) views of its segment's rows (B, size)."""
    return Segment("lowrank", 0, b.a_dim, b.R, b.rank).parts(rows)


def _single(t: Any) -> Any:
    """A half-precision floating tensor as float32; anything else unchanged."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in (torch.bfloat16, torch.float16) else t


def check_tolerance(rows: torch.Tensor, grad_dtype: torch.dtype | None = None,
                    rounded_in: torch.dtype | None = None) -> float:
    """Relative tolerance of the first batch's checks (sums, example 0): they look for structural errors
    (a misattributed example is off by O(1)), not rounding. 1e-8 in float64, 2e-3 in float32, 64 TF32
    roundoffs (2^-11 each, 3%) for float32 on CUDA with TF32 on (a projected index's default); a model
    computing in half precision (its gradients `grad_dtype` bfloat16 / float16): 4 of their epsilons
    (bfloat16 3.1%, float16 0.4%), the batch gradient it is compared with being rounded so too. A float64
    model with a layer computing in float32 (`rounded_in`: Gemma's norms) is checked as float32."""
    if grad_dtype in (torch.bfloat16, torch.float16):
        return max(2e-3, 4 * torch.finfo(grad_dtype).eps)
    if rows.dtype == torch.float64:
        return 2e-3 if rounded_in == torch.float32 else 1e-8
    if rows.is_cuda and rows.dtype == torch.float32 and tf32_enabled():
        return 64 * TF32_UNIT_ROUNDOFF
    return 2e-3


BATCH_FIRST, SEQUENCE_FIRST, FOLDED = 0, 1, 2   # how one call of a layer holds the batch (batch_layouts)


def batch_layouts(handler: Any, inputs: tuple, output: Any, B: int) -> tuple[int, ...]:
    """How one call of a layer may hold a batch of B examples, most likely first (one when the shapes tell):
        BATCH_FIRST     (B, ...)
        SEQUENCE_FIRST  (T, B, ...), T > 1: PyTorch's default for nn.TransformerEncoderLayer (batch_first=False)
        FOLDED          (B k, ...), example-major: a model that flattens its positions into the batch
                        (OPT's hidden_states.reshape(-1, D), Swin's windows, MobileViT's patches)
    The last two only for handlers acting on each position alone (`position_wise = True`: Linear,
    Embedding, LayerNorm, RMSNorm, affine norms), whose input and output share the leading dimensions.
    Ambiguous: T == B (batch- or sequence-first), and (k B, B, ...) (sequence- or folded). A leading size 1
    is an output shared by the batch (position embeddings of (1, T)): batch-first. With one example every
    position is its own: FOLDED (k = n) covers all three."""
    x = inputs[0] if inputs else None
    if not (getattr(handler, "position_wise", False) and isinstance(x, torch.Tensor)
            and isinstance(output, torch.Tensor) and x.dim() >= 1 and output.dim() >= 1
            and x.shape[0] == output.shape[0] > 1):
        return (BATCH_FIRST,)
    n = output.shape[0]
    if B == 1:
        return (FOLDED,)
    # (T, B, features...): the output keeps a feature dimension after the two (a (T, B) output would be
    # features read as the batch: a Linear on a (T, in) table with in == B)
    second = x.dim() >= 2 and output.dim() >= 3 and x.shape[1] == output.shape[1] == B
    if n == B:
        return (BATCH_FIRST, SEQUENCE_FIRST) if second else (BATCH_FIRST,)
    if n % B == 0:
        return (SEQUENCE_FIRST, FOLDED) if second else (FOLDED,)
    return (SEQUENCE_FIRST,) if second else (BATCH_FIRST,)


def layouts_on_fewer(grads: GradientComputer, state: dict, inputs: Any, targets: torch.Tensor | None,
                     handlers: dict[Any, Any]) -> dict[Any, list[tuple[tuple[int, ...], int | None]]]:
    """Per key of `handlers`, (batch_layouts, leading size of the output) of each call of that handler's layer
    in a no-grad forward over the batch's first B - 1 examples: what tells the layouts that B examples leave
    open, and whether a folded layer's rows follow the number of examples."""
    B = tree.length(inputs)
    shapes: dict[Any, list] = {k: [] for k in handlers}

    def hook(k, h):
        def look(m, i, o):
            shapes[k].append((batch_layouts(h, i, o, B - 1),
                              o.shape[0] if isinstance(o, torch.Tensor) and o.dim() else None))
        return look

    handles = [h.attach(hook(k, h)) for k, h in handlers.items()]
    try:
        x, y = grads.batch(tree.take(inputs, 0, B - 1), None if targets is None else targets[:B - 1])
        with torch.no_grad(), model_mode(grads.model, grads.train_mode):
            grads.forward(state, x, y)
    finally:
        for h in handles:
            h.remove()
    return shapes


def per_example_copy(x: Any, output: Any, B: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, output) expanded to B examples when both have leading size 1 and B > 1: an output shared by the batch
    (position embeddings of ids (1, T)), replaced by a per-example copy whose gradient is each example's own (it
    broadcasts downstream as before); else None."""
    if B > 1 and isinstance(output, torch.Tensor) and output.dim() and output.shape[0] == 1 \
            and isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == 1:
        return x.expand(B, *x.shape[1:]), output.expand(B, *output.shape[1:]).clone()
    return None


def record_call(handler: Any, inputs: tuple, output: Any, layout: int, B: int) -> tuple[Any, Any, int]:
    """(ctx, probe, layout) of one call for the handler, which is handed (B, ...) views of its input and
    output (batch_layouts); the probe stays the output itself."""
    if layout == BATCH_FIRST:
        return (*handler.record(inputs, output), layout)
    view = (lambda t: t.transpose(0, 1)) if layout == SEQUENCE_FIRST else (lambda t: t.unflatten(0, (B, -1)))
    return handler.record((view(inputs[0]), *inputs[1:]), view(output))[0], output, layout


def read_grad(probe: torch.Tensor, g: torch.Tensor | None, layout: int, B: int) -> torch.Tensor:
    """The gradient of a probe as its handler reads it (record_call's view of it): zeros if unused."""
    g = torch.zeros_like(probe) if g is None else g
    if layout == SEQUENCE_FIRST:
        return g.transpose(0, 1)
    return g.unflatten(0, (B, -1)) if layout == FOLDED else g


def probe_batch_ok(probe: torch.Tensor, layout: int, B: int) -> bool:
    """Whether a probe's shape holds B examples in its layout."""
    if layout == FOLDED:
        return probe.shape[0] % B == 0
    return probe.shape[layout] == B


def build(grads: GradientComputer) -> HookFeaturizer | None:
    """A HookFeaturizer when the handlers cover the selected parameters (up to a small generic rest), else None."""
    try:
        return HookFeaturizer(grads)
    except Unsupported:
        return None
