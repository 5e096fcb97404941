"""Penultimate-layer embeddings and their nearest neighbours: the view TracIn is compared with.

Example:
    >>> E_train = embed(tracin, train_data)                 # (n_train, d), last checkpoint
    >>> nn = nearest_neighbors(E_train, embed(tracin, test_data), k=10)   # Neighbors, cosine

The embedding is the input of the last module that has trainable parameters (for a classifier,
the features its final linear layer sees), captured with a forward hook; cosine similarity ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call

from ..data import BatchFn, as_source
from ..errors import TracInError
from ..gradients.per_example import parameter_groups
from ..store.topk import Neighbors



def _last_module(model: torch.nn.Module, layer: str | None) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if layer is None:
        layer = list(parameter_groups(model))[-1]
    if layer not in modules:
        raise TracInError(f"unknown layer {layer!r}; valid names are {list(parameter_groups(model))}.")
    return modules[layer]


def embed(tracin: Any, data: Any, layer: str | None = None, checkpoint: int = -1,
          batch_fn: BatchFn | None = None, batch_size: int = 512) -> torch.Tensor:
    """Inputs of `layer` (default: the last layer with parameters) at a checkpoint: Tensor (n, d)."""
    source = as_source(data, batch_fn)
    module = _last_module(tracin.model, layer)
    state = tracin.state(checkpoint % len(tracin.checkpoints))
    grabbed: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _m, inp, _out: grabbed.append(inp[0].detach().flatten(1)))
    was = tracin.model.training
    tracin.model.eval()
    try:
        with torch.no_grad():
            for _, x, _ in source.batches(batch_size):
                x = x.to(tracin.device)
                functional_call(tracin.model, state, (x.to(tracin.featurizer.grads.dtype) if x.is_floating_point() else x,))
    finally:
        hook.remove()
        tracin.model.train(was)
    return torch.cat(grabbed).cpu()


def nearest_neighbors(train_emb: torch.Tensor, test_emb: torch.Tensor, k: int = 10) -> Neighbors:
    """k most cosine-similar training embeddings per test embedding: Neighbors (m, k), best first."""
    a = torch.nn.functional.normalize(test_emb.float(), dim=1)
    b = torch.nn.functional.normalize(train_emb.float(), dim=1)
    scores, idx = (a @ b.T).topk(min(k, b.shape[0]), dim=1)
    return Neighbors(idx, scores)
