"""Which handler computes which parameter's per-example gradient: the model's selected parameters as blocks.

Example:
    >>> blocks = plan_blocks(gc.model, gc.param_names, gc.train_mode)
    >>> [(b.kind, b.params) for b in blocks]     # [("kron", ["0.weight", "0.bias"]), ("vector", ...), ...]

A block is one segment of a feature row:
    kron:    one weight W (R, C) (+ its bias as a column), used by one or more modules (tied weights,
             a module called several times): its gradient is the sum over uses and calls;
    vector:  the small parameters of one module with a VectorHandler (norm layers);
    generic: every selected parameter no handler covers (a ViT's cls_token / pos_embed), computed by
             the per-example vmap/loop path restricted to them (allowed up to GENERIC_LIMIT numbers).
Tied parameters are found by identity, so GPT-2's lm_head (whose weight is wte.weight) adds its use
to the embedding's block. Blocks follow the order of the modules (generic last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Sequence

from torch import nn
from torch.nn.utils import parametrize

from .handlers import KronHandler, LayerHandler, Unsupported, handler_for

GENERIC_LIMIT = 2**20   # numbers per example on the generic path before the hook path refuses the model


@dataclass
class Use:
    """One module whose calls contribute to a block."""

    name: str
    handler: LayerHandler


@dataclass
class Block:
    kind: str                       # "kron" | "vector" | "generic"
    params: list[str]               # canonical parameter names, in the block's flat order (weight, bias)
    uses: list[Use] = field(default_factory=list)
    R: int = 0                      # kron: weight rows
    C: int = 0                      # kron: weight cols (without the bias column)
    has_bias: bool = False
    n: int = 0                      # vector / generic: numbers per example
    outer: bool = False             # kron: stored as its two factors (one use, one position)
    rank: int = 0                   # kron: stored as `rank` factor pairs (exact rows; see hooks.py), else 0

    @property
    def a_dim(self) -> int:
        return self.C + self.has_bias

    @property
    def numel(self) -> int:
        return self.R * self.a_dim if self.kind == "kron" else self.n

    def describe(self) -> str:
        mods = ", ".join(f"{u.name or '<model>'} ({type(u.handler.module).__name__})" for u in self.uses)
        return mods or ", ".join(self.params)


def canonical_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name (named_parameters' deduplicated name)."""
    return {id(p): n for n, p in model.named_parameters()}


def plan_blocks(model: nn.Module, param_names: Sequence[str], train_mode: bool,
                shapes: dict[str, tuple] | None = None, exclude: Collection[str] = ()) -> list[Block]:
    """Blocks covering exactly `param_names`; raises Unsupported for tied weights with biases. A layer
    whose handler cannot take it (unsupported(), only some of its parameters selected, or a weight computed
    by a parametrization: weight_norm's original0/1) goes to the generic block with its sublayers'
    parameters (its own forward may read them directly); so do the modules named in `exclude` (found not
    to hold the batch, or whose weight is also used outside them: handlers.GenericLayers)."""
    selected = set(param_names)
    canon = canonical_names(model)
    by_weight: dict[str, Block] = {}
    blocks: list[Block] = []
    covered: set[str] = set()
    left: list[str] = []      # modules with a handler that cannot take them: their sublayers go generic too
    for mod_name, mod in model.named_modules():
        if any(mod_name.startswith(p + ".") for p in left):
            continue                                   # (nn.MultiheadAttention reads out_proj.weight itself)
        own = {local: canon[id(p)] for local, p in mod.named_parameters(recurse=False) if id(p) in canon}
        sel = {local: name for local, name in own.items() if name in selected}
        if not sel:
            continue
        H = handler_for(mod)
        if H is None:
            continue                                   # its parameters go to the generic block
        if mod_name in exclude:
            left.append(mod_name)
            continue
        if H.unsupported(mod, train_mode) is not None or set(own) - H.covered(mod) or set(sel) != set(own) \
                or parametrize.is_parametrized(mod):         # (weight_norm: its weight is computed, not a parameter)
            left.append(mod_name)
            continue
        for h in H.parts(mod):
            if isinstance(h, KronHandler):
                wl, bl = h.param_locals()
                if wl not in sel:
                    continue
                w = sel[wl]
                R, C = h.shape()
                if w in by_weight:
                    blk = by_weight[w]
                    if blk.has_bias or h.has_bias or (blk.R, blk.C) != (R, C):
                        raise Unsupported(f"weight {w!r} is shared by layers with biases or different shapes "
                                          f"({blk.describe()}, {mod_name} ({type(mod).__name__}))")
                    blk.uses.append(Use(mod_name, h))
                    blk.outer = False
                    continue
                params = [w] + ([sel[bl]] if bl is not None else [])
                blk = Block("kron", params, [Use(mod_name, h)], R=R, C=C, has_bias=h.has_bias,
                            outer=getattr(h, "rank_one_hint", False))
                by_weight[w] = blk
            else:
                names = [sel[n] for n in h.present()]
                if any(n in covered for n in names):
                    raise Unsupported(f"parameters {names} are shared between normalization layers")
                blk = Block("vector", names, [Use(mod_name, h)], n=h.size())
            blocks.append(blk)
            covered.update(blk.params)
    rest = [n for n in param_names if n not in covered]
    if rest:
        params = dict(model.named_parameters())
        blocks.append(Block("generic", rest, n=sum(params[n].numel() for n in rest)))
    return blocks


def generic_sizes(model: nn.Module, block: Block) -> str:
    """'name (shape, numbers), ...' of a generic block, for error messages."""
    params = dict(model.named_parameters())
    return ", ".join(f"{n} {tuple(params[n].shape)} = {params[n].numel()}" for n in block.params)
