"""Configs as data: one typed parser for every config dataclass, and the text ``--help`` shows.

A config is a ``@dataclass`` whose fields carry their help and checks as metadata::

    iterations: int = field(default=1000, metadata={"help": "Optimiser steps.", "min": 1})

Metadata keys: ``help`` (one sentence), ``min`` / ``max`` (inclusive bounds), ``gt`` / ``lt``
(exclusive bounds) and ``choices``. :func:`parse_config` types and checks values that are strings
(``--set``, ``--budget``) or already typed (TOML, Python); :func:`describe` lists the fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from erasekit.errors import ErasekitError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
NONE = ("none", "null")
LARGEST_INT = 2**31 - 1  # the bound of a field without its own: larger is a typo, not a setting
LARGEST_FLOAT = 1e12


class _Bad(Exception):
    """A value that does not fit the annotation (internal; turned into an ErasekitError)."""


# ---------------------------------------------------------------------------- types
def _union_args(annotation) -> list | None:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return None


def type_name(annotation) -> str:
    """``int | None`` -> ``int or none``; for messages and --help."""
    union = _union_args(annotation)
    if union is not None:
        names = [type_name(a) for a in union if a is not type(None)]
        return " or ".join(names + (["none"] if type(None) in union else []))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple) or annotation in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {type_name(inner[0])}" if inner else "list"
    if origin is dict or annotation is dict:
        return "table" if not args else f"table of {type_name(args[1])}"
    return getattr(annotation, "__name__", str(annotation))


def _expected(annotation, strings: bool = True) -> str:
    """What to write, in words (``strings``: on the command line)."""
    union = _union_args(annotation)
    if union is not None:
        parts = [_expected(a, strings) for a in union if a is not type(None)]
        return " or ".join(parts + (["none"] if type(None) in union else []))
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "true or false (bool)"
    if annotation is int:
        return "a whole number (int)"
    if annotation is float:
        return "a finite number (float)"
    if annotation is str:
        return "a string (str)"
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin in (list, tuple) or annotation in (list, tuple):
        return f"a {type_name(annotation)}" + (" (comma-separated or a JSON list)" if strings else "")
    if origin is dict or annotation is dict:
        return "a JSON object" if strings else "a table"
    return f"a {type_name(annotation)}"


def convert(value, annotation, strings: bool = True):
    """``value`` as ``annotation``; raises ``_Bad`` when it does not fit.

    With ``strings`` a string is parsed (``"1e3"``, ``"true"``, ``"a,b"``, ``"none"``); without, as for
    TOML, values must already have their type and a string fits only a string field.
    """
    if annotation is Any:
        return value
    text = value.strip() if isinstance(value, str) and strings else None
    union = _union_args(annotation)
    if union is not None:
        if type(None) in union and (value is None or text is not None and text.lower() in NONE):
            return None
        for option in [a for a in union if a is not type(None)]:
            try:
                return convert(value, option, strings)
            except _Bad:
                pass
        raise _Bad
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise _Bad
    if annotation is int:
        if isinstance(value, bool):
            raise _Bad
        if isinstance(value, int):
            return value
        number = _number(value, text)
        if not number.is_integer():
            raise _Bad
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise _Bad
        return _number(value, text)
    if annotation is str:
        if not isinstance(value, str):
            raise _Bad
        return value
    if origin is typing.Literal:
        for choice in args:
            try:
                if convert(value, type(choice), strings) == choice:
                    return choice
            except _Bad:
                pass
        raise _Bad
    if origin in (list, tuple) or annotation in (list, tuple):
        if text is not None:
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    raise _Bad from None
            else:
                value = [item.strip() for item in text.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise _Bad
        inner = [a for a in args if a is not Ellipsis]
        items = [convert(item, inner[0], strings) for item in value] if inner else list(value)
        return tuple(items) if (origin or annotation) is tuple else items
    if origin is dict or annotation is dict:
        if text is not None:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise _Bad from None
        if not isinstance(value, Mapping):
            raise _Bad
        return {key: convert(item, args[1], strings) for key, item in value.items()} if args else dict(value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        if text is None:
            raise _Bad
        try:
            return annotation(text)
        except (TypeError, ValueError):
            raise _Bad from None
    return value


def _number(value, text: str | None) -> float:
    if text is not None:
        try:
            number = float(text)
        except ValueError:
            raise _Bad from None
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise _Bad
    if not math.isfinite(number):
        raise _Bad
    return number


# ---------------------------------------------------------------------------- checks
def _problem(name: str, value, metadata: Mapping) -> str | None:
    """What is wrong with a typed value under the field's ``min``/``max``/``gt``/``lt``/``choices``, or None."""
    if value is None:
        return None
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        return f"{name} must be one of {', '.join(str(c) for c in choices)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in metadata and value < metadata["min"]:
            return f"{name} must be at least {metadata['min']}"
        if "max" in metadata and value > metadata["max"]:
            return f"{name} must be at most {metadata['max']}"
        if "gt" in metadata and not value > metadata["gt"]:
            return f"{name} must be greater than {metadata['gt']}"
        if "lt" in metadata and not value < metadata["lt"]:
            return f"{name} must be less than {metadata['lt']}"
        limit = LARGEST_INT if isinstance(value, int) else LARGEST_FLOAT
        if "max" not in metadata and "lt" not in metadata and abs(value) > limit:
            return f"{name} = {value:g} is absurdly large (its size is at most {limit:,})"
    return None


def _bounds(metadata: Mapping) -> str:
    parts = [f"{op} {metadata[key]}" for key, op in (("min", ">="), ("gt", ">"), ("max", "<="), ("lt", "<")) if key in metadata]
    if metadata.get("choices") is not None:
        parts.append("one of " + ", ".join(str(c) for c in metadata["choices"]))
    return ", ".join(parts)


def _fix(metadata: Mapping) -> str:
    if metadata.get("choices") is not None:
        return "pass one of " + ", ".join(str(c) for c in metadata["choices"])
    return f"pass a value {_bounds(metadata)}"


def _is_flag(source: str) -> bool:
    return source.startswith("-") or source.isidentifier()


def _shown(source: str, key: str, value) -> str:
    if _is_flag(source):
        return f"{source} {key}={value if isinstance(value, str) else json.dumps(value, default=str)}"
    return f"{source}: {key} = {value!r}"


def _literal(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _sample(annotation):
    """A value of ``annotation`` to show in an example (None when there is no simple one)."""
    annotation = [a for a in (_union_args(annotation) or [annotation]) if a is not type(None)][0]
    if typing.get_origin(annotation) in (list, tuple):
        inner = _sample(typing.get_args(annotation)[0])
        return None if inner is None else [inner, inner]
    return {bool: True, int: 1, float: 0.5, str: "text"}.get(annotation)


def _example(source: str, key: str, f: dataclasses.Field, annotation, strings: bool = True) -> str:
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    if default is None or default == "" or (isinstance(default, (list, tuple, dict)) and not default):
        default = _sample(annotation)
        plain = [a for a in (_union_args(annotation) or [annotation]) if a is not type(None)][0]
        if default is None and (typing.get_origin(plain) or plain) is dict and not strings:
            return f"write it as a table, e.g. [{key}.NAME]"
        if default is None:
            return f"write {_expected(annotation, strings)}"
    if _is_flag(source):
        flag = f"{source} " if source.startswith("-") else ""
        return f"write e.g. {flag}{key}={_literal(default)}"
    return f"write e.g. {key} = {json.dumps(default)}"


# ---------------------------------------------------------------------------- the parser
def parse_values(config_cls, values: Mapping[str, Any] | None, source: str = "--set", name: str | None = None,
                 strings: bool = True) -> dict:
    """``values`` typed and checked by ``config_cls``'s fields (a dict of field name -> value).

    ``source`` names where they came from in error messages: a flag (``--set``, ``--budget``),
    a word (``budget``) or a file/table (``bench.toml``); ``name`` the method or attack.
    ``strings=False`` (TOML): values must have their field's type already (see :func:`convert`).
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    typed = {}
    for key, value in (values or {}).items():
        key = str(key).strip()
        if key not in fields:
            owner = f" for {name}" if name else ""
            where = f"unknown {source} key" if _is_flag(source) else f"{source}: unknown key"
            raise ErasekitError(f"{where} {key!r}{owner}; valid keys: {', '.join(fields)}")
        f, annotation = fields[key], hints[key]
        try:
            typed[key] = convert(value, annotation, strings)
        except _Bad:
            raise ErasekitError(
                f"{_shown(source, key, value)}: {key} is {_expected(annotation, strings)}; "
                f"{_example(source, key, f, annotation, strings)}"
            ) from None
        problem = _problem(key, typed[key], f.metadata)
        if problem:
            raise ErasekitError(f"{_shown(source, key, value)}: {problem}; {_fix(f.metadata)}")
    return typed


def parse_config(config_cls, values: Mapping[str, Any] | None = None, source: str = "--set", name: str | None = None,
                 strings: bool = True):
    """An instance of ``config_cls`` from its defaults and ``values`` (see :func:`parse_values`)."""
    return config_cls(**parse_values(config_cls, values, source, name, strings))


def check_config(config, source: str = "config") -> None:
    """Check an already built config against its fields' bounds and choices (one-line ErasekitError)."""
    for f in dataclasses.fields(config):
        problem = _problem(f.name, getattr(config, f.name), f.metadata)
        if problem:
            raise ErasekitError(f"{_shown(source, f.name, getattr(config, f.name))}: {problem}; {_fix(f.metadata)}")


# ---------------------------------------------------------------------------- --help
def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def describe(config_cls, presets: Mapping[str, Mapping] | None = None, flag: str | None = "--set",
             presets_title: str = "presets (--preset NAME)") -> str:
    """Every field of ``config_cls`` (name, type, default, bounds, help), then the presets and what each overrides."""
    hints = typing.get_type_hints(config_cls)
    fields = dataclasses.fields(config_cls)
    usage = f" ({flag} KEY=VALUE)" if flag else ""
    lines = [f"{config_cls.__name__} keys{usage}:"]
    for f in fields:
        bounds = _bounds(f.metadata)
        lines.append(f"  {f.name}: {type_name(hints[f.name])} = {_default_text(f)}" + (f"  [{bounds}]" if bounds else ""))
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    if presets:
        lines += ["", f"{presets_title}:"]
        width = max(len(p) for p in presets)
        for preset, overrides in presets.items():
            what = ", ".join(f"{k}={v!r}" for k, v in overrides.items()) or "the defaults"
            lines.append(f"  {preset:<{width}}  {what}")
    return "\n".join(lines)
