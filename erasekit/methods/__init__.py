"""The erasure methods, one file each.

Every method module defines

* a ``@dataclass`` config whose defaults are the paper's (e.g. ``UCEConfig``), named in ``CONFIG``;
* ``PRESETS``: named overrides of that config; every method has at least ``paper`` and ``toy``;
* ``erase(model, concepts, preserve=(), config=None, progress=True) -> Erasure``.

This module finds a method by name, builds its config from a preset plus
``key=value`` overrides (typed by the dataclass fields), and runs it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing

from erasekit.errors import ErasekitError

METHODS = {
    "esd": "erasekit.methods.esd",
    "uce": "erasekit.methods.uce",
    "rece": "erasekit.methods.rece",
    "receler": "erasekit.methods.receler",
    "cpe": "erasekit.methods.cpe",
}


def get_method(name: str):
    """The method's module; a clear error for unknown or not-yet-implemented methods."""
    if name not in METHODS:
        raise ErasekitError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    try:
        return importlib.import_module(METHODS[name])
    except ModuleNotFoundError as error:
        if error.name == METHODS[name]:
            raise ErasekitError(f"method {name!r} is not implemented in this version of erasekit yet; available: {', '.join(available_methods())}") from None
        raise


def available_methods() -> list[str]:
    return [name for name, path in METHODS.items() if importlib.util.find_spec(path) is not None]


def _parse_value(text: str, annotation, key: str):
    """Turn a --set string into the field's type (bool, int, float, str, list, optional)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(text, args[0], key)
    try:
        if annotation is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
        if origin in (list, tuple):
            items = json.loads(text) if text.startswith("[") else [t for t in text.split(",") if t]
            inner = typing.get_args(annotation)[0] if typing.get_args(annotation) else str
            return [(_parse_value(str(i), inner, key) if not isinstance(i, inner) else i) for i in items]
    except ValueError:
        raise ErasekitError(f"--set {key}={text}: expected {getattr(annotation, '__name__', annotation)}") from None
    return text


def build_config(method: str, preset: str | None = None, overrides: dict[str, str] | None = None):
    """The method's config: its dataclass defaults, then the preset, then ``--set`` overrides."""
    module = get_method(method)
    config_cls = module.CONFIG
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    values = {}
    if preset:
        if preset not in module.PRESETS:
            raise ErasekitError(f"unknown preset {preset!r} for {method}; choose one of: {', '.join(module.PRESETS)}")
        values.update(module.PRESETS[preset])
    for key, text in (overrides or {}).items():
        if key not in fields:
            raise ErasekitError(f"unknown --set key {key!r} for {method}; valid keys: {', '.join(fields)}")
        values[key] = _parse_value(text, hints[key], key) if isinstance(text, str) else text
    return config_cls(**values)


def erase(model, method: str, concepts, preserve=(), config=None, preset: str | None = None, overrides=None, progress: bool = True):
    """Erase ``concepts`` from ``model`` with ``method``; returns an :class:`~erasekit.Erasure`.

    ``config`` is the method's config dataclass; or give ``preset`` and/or ``overrides``.
    """
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = [c.strip() for c in concepts if c.strip()]
    if not concepts:
        raise ErasekitError("no concept to erase; pass at least one --concept")
    module = get_method(method)
    if config is None:
        config = build_config(method, preset, overrides)
    for text in [*concepts, *preserve]:
        model.check_prompt_fits(text)
    return module.erase(model, concepts, preserve=list(preserve), config=config, progress=progress)
