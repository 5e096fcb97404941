"""Layer handlers: the only place that knows layer types. One module per layer kind, registered by type.

Example:
    >>> from tracin_engine.gradients.handlers import register_handler, handler_for, KronHandler
    >>> handler_for(nn.Linear(3, 2))                 # LinearHandler (the class)
    >>> register_handler(MyLayer, MyLayerHandler)    # see docs/handlers.md for a worked example

Lookup walks the module's class hierarchy (a subclass of nn.Linear gets the Linear handler unless
it has its own). A handler can also be registered under a dotted class name
("transformers.pytorch_utils.Conv1D"), so a library need not be imported to support its layers.
Built-in kinds: Linear (inputs of any leading shape), transformers' Conv1D, Conv1d, Conv2d,
Embedding, LayerNorm, GroupNorm, BatchNorm1d/2d/3d (eval mode), RMSNorm.
"""

from __future__ import annotations

from torch import nn

from .base import KronHandler, LayerHandler, Unsupported, VectorHandler

_BY_TYPE: dict[type, type[LayerHandler]] = {}
_BY_NAME: dict[str, type[LayerHandler]] = {}


def register_handler(layer_type: type | str, handler_cls: type[LayerHandler]) -> None:
    """Use `handler_cls` (a KronHandler or VectorHandler subclass) for modules of `layer_type`
    (a class, or its dotted name "package.module.ClassName"); replaces an earlier registration."""
    from ...errors import TracInError

    if not (isinstance(handler_cls, type) and issubclass(handler_cls, (KronHandler, VectorHandler))):
        raise TracInError(f"handler_cls must be a KronHandler or VectorHandler subclass, got {handler_cls!r}.")
    if isinstance(layer_type, str):
        _BY_NAME[layer_type] = handler_cls
    elif isinstance(layer_type, type) and issubclass(layer_type, nn.Module):
        _BY_TYPE[layer_type] = handler_cls
    else:
        raise TracInError(f"layer_type must be an nn.Module subclass or its dotted name, got {layer_type!r}.")


def handler_for(module: nn.Module) -> type[LayerHandler] | None:
    """The handler class registered for the module's class or its nearest registered base, or None."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in _BY_NAME:
            return _BY_NAME[name]
    return None


from . import conv, embedding, linear, norm  # noqa: E402  (built-in registrations)

__all__ = ["KronHandler", "LayerHandler", "Unsupported", "VectorHandler", "handler_for", "register_handler",
           "conv", "embedding", "linear", "norm"]
