"""Personalization methods behind one interface, and their registry.

Each method lives in its own subpackage (``editbench/methods/<name>/``: ``config.py``, ``layers.py``,
``editor.py``) and registers its :class:`~editbench.methods.base.Editor` subclass with :func:`register` when
imported. :func:`available` and :func:`get` import the built-in subpackages on demand::

    from editbench import methods
    methods.available()                      # ['custom_diffusion', 'dreambooth', 'lora', 'perfusion', ...]
    editor = methods.get("perfusion")(steps=200)
"""

from __future__ import annotations

import importlib
import importlib.util

from editbench.errors import EditbenchError
from editbench.methods.base import Artifact, EditHandle, Editor

__all__ = ["BUILTIN", "Artifact", "EditHandle", "Editor", "available", "get", "register"]

BUILTIN: tuple[str, ...] = ("perfusion", "custom_diffusion", "textual_inversion", "dreambooth", "lora")
"""Subpackages of ``editbench.methods`` imported by :func:`available` (those not written yet are skipped)."""

_REGISTRY: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    """Class decorator: make an :class:`Editor` subclass available under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Editor)):
        raise EditbenchError(f"register expects an Editor subclass, got {cls!r}")
    if not cls.name or not cls.name.isidentifier():
        raise EditbenchError(f"{cls.__name__}.name must be a non-empty identifier, got {cls.name!r}")
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise EditbenchError(f"method name {cls.name!r} is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _import_builtins() -> None:
    for name in BUILTIN:
        module = f"{__name__}.{name}"
        if importlib.util.find_spec(module) is not None:  # not written yet -> skipped; real errors propagate
            importlib.import_module(module)


def available() -> list[str]:
    """Names of every registered method, sorted (built-ins are imported first)."""
    _import_builtins()
    return sorted(_REGISTRY)


def get(name: str) -> type[Editor]:
    """The Editor class registered as ``name``; EditbenchError listing the available names if unknown."""
    if name not in _REGISTRY:
        _import_builtins()
    if name not in _REGISTRY:
        raise EditbenchError(f"unknown method {name!r}; available: {', '.join(available()) or 'none'}")
    return _REGISTRY[name]
