"""The handler registry: layer type (or dotted class name) -> handler class.

    >>> register_handler(MyLayer, MyLayerHandler)
    >>> handler_for(nn.Linear(3, 2))                 # LinearHandler (the class)
"""

from __future__ import annotations

from torch import nn

from ...errors import TracInError
from .base import KronHandler, LayerHandler, VectorHandler

_BY_TYPE: dict[type, type[LayerHandler]] = {}
_BY_NAME: dict[str, type[LayerHandler]] = {}
_FALLBACKS: list[type[LayerHandler]] = []   # claim modules by structure (affine_norm.py), after the types


def register_handler(layer_type: type | str, handler_cls: type[LayerHandler]) -> None:
    """Use `handler_cls` (a KronHandler or VectorHandler subclass) for modules of `layer_type`
    (a class, or its dotted name "package.module.ClassName"); replaces an earlier registration."""
    if not (isinstance(handler_cls, type) and issubclass(handler_cls, (KronHandler, VectorHandler))):
        raise TracInError(f"handler_cls must be a KronHandler or VectorHandler subclass, got {handler_cls!r}.")
    if isinstance(layer_type, str):
        _BY_NAME[layer_type] = handler_cls
    elif isinstance(layer_type, type) and issubclass(layer_type, nn.Module):
        _BY_TYPE[layer_type] = handler_cls
    else:
        raise TracInError(f"layer_type must be an nn.Module subclass or its dotted name, got {layer_type!r}.")


def register_fallback(handler_cls: type[LayerHandler]) -> None:
    """Use `handler_cls` for modules no registered type covers whose structure it claims
    (`handler_cls.claims(module)`: a classmethod returning bool), tried in registration order."""
    if handler_cls not in _FALLBACKS:
        _FALLBACKS.append(handler_cls)


def handler_for(module: nn.Module) -> type[LayerHandler] | None:
    """The handler class registered for the module's class or its nearest registered base; else the first
    fallback that claims the module; else None. A handler with `exact_forward` (it recomputes the registered
    class's function) is not given a subclass that defines its own forward: the fallbacks are asked."""
    for cls in type(module).__mro__:
        H = _BY_TYPE.get(cls) or _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if H is None:
            continue
        if not (getattr(H, "exact_forward", False) and type(module).forward is not cls.forward):
            return H
        break
    return next((F for F in _FALLBACKS if F.claims(module)), None)
