"""Layer handlers: the only place that knows layer types. One module per layer kind, registered by type.

Example:
    >>> from tracin_engine.gradients.handlers import register_handler, handler_for, KronHandler
    >>> handler_for(nn.Linear(3, 2))                 # LinearHandler (the class)
    >>> register_handler(MyLayer, MyLayerHandler)    # see docs/handlers.md for a worked example

Lookup walks the module's class hierarchy (a subclass of nn.Linear gets the Linear handler unless
it has its own). A handler can also be registered under a dotted class name
("transformers.pytorch_utils.Conv1D"), so a library need not be imported to support its layers.
Built-in kinds: Linear (inputs of any leading shape), transformers' Conv1D, Conv1d, Conv2d,
Embedding, LayerNorm, GroupNorm, BatchNorm1d/2d/3d (eval mode), RMSNorm, LSTM / GRU / RNN and their cells,
MultiheadAttention (so nn.TransformerEncoder / Decoder layers); and, by structure, other libraries' norm
layers with a 1-D scale (Hugging Face's LlamaRMSNorm, T5LayerNorm, ...: affine_norm.py) and transformers'
fused mixture-of-experts weights (Mixtral, Qwen-MoE, OLMoE: experts.py).
"""

from __future__ import annotations

from . import affine_norm, attention, conv, embedding, experts, linear, norm, rnn, rnn_cell  # noqa: F401  (built-in registrations)
from .base import GenericLayers, KronHandler, LayerHandler, SharedInput, Unsupported, VectorHandler
from .registry import handler_for, register_handler

__all__ = ["GenericLayers", "KronHandler", "LayerHandler", "SharedInput", "Unsupported", "VectorHandler", "handler_for", "register_handler",
           "affine_norm", "attention", "conv", "embedding", "experts", "linear", "norm", "rnn", "rnn_cell"]
