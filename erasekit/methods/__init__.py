"""The erasure methods, one file each.

Every method module defines

* a ``@dataclass`` config whose defaults are the paper's (e.g. ``UCEConfig``), named in ``CONFIG``;
* ``PRESETS``: named overrides of that config; every method has at least ``paper`` and ``toy``;
* ``erase(model, targets, config=None, progress=True) -> Erasure``, where the targets
  (:class:`erasekit.targets.EraseTarget`) say what to erase; a method never parses a concept.

A trained method whose run splits over several processes sets ``DATA_PARALLEL = True`` (ESD,
Receler: :class:`erasekit.training.DataParallel`); under ``accelerate launch`` or ``torchrun`` every
process runs it. Every other method runs on process 0 alone while the others wait (UCE and RECE are
closed-form solves; CPE never runs the UNet, and its steps, one template and a batch of anchors through
the K/V projections, are too small to split).

This module finds a method by name, builds its config from a preset plus
``key=value`` overrides (typed by the dataclass fields), and runs it.
"""

from __future__ import annotations

import importlib
import importlib.util

from erasekit import distributed
from erasekit.config import describe, parse_values
from erasekit.errors import ErasekitError

METHODS = {
    "esd": "erasekit.methods.esd",
    "uce": "erasekit.methods.uce",
    "rece": "erasekit.methods.rece",
    "receler": "erasekit.methods.receler",
    "cpe": "erasekit.methods.cpe",
    "adv": "erasekit.methods.adv",
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


def is_data_parallel(name: str) -> bool:
    """Whether the method's run splits over several processes (else it runs on process 0 alone)."""
    return bool(getattr(get_method(name), "DATA_PARALLEL", False))


def available_methods() -> list[str]:
    return [name for name, path in METHODS.items() if importlib.util.find_spec(path) is not None]


def build_config(method: str, preset: str | None = None, overrides: dict[str, str] | None = None, kind: str | None = None):
    """The method's config: its dataclass defaults, then the preset, then ``--set`` overrides.

    A preset may have per-kind layers, ``PRESETS["NAME:KIND"]``: with the concepts' ``kind`` known,
    its values go on top of ``NAME``'s (``toy`` for a shape, ``toy`` then ``toy:style`` for a style).
    """
    module = get_method(method)
    values = {}
    if preset:
        if preset not in module.PRESETS:
            raise ErasekitError(f"unknown preset {preset!r} for {method}; choose one of: {', '.join(module.PRESETS)}")
        values.update(parse_values(module.CONFIG, module.PRESETS[preset], source=f"preset {preset!r}", name=method))
        layer = f"{preset}:{kind}"
        if kind and layer in module.PRESETS:
            values.update(parse_values(module.CONFIG, module.PRESETS[layer], source=f"preset {layer!r}", name=method))
    values.update(parse_values(module.CONFIG, overrides, source="--set", name=method))
    return module.CONFIG(**values)


def describe_method(method: str) -> str:
    """The method's config keys (type, default, help) and presets, as ``--help`` shows them."""
    module = get_method(method)
    return describe(module.CONFIG, module.PRESETS, flag="--set")


def run_method(model, method: str, targets, config=None, preset: str | None = None, overrides=None, progress: bool = True):
    """Run ``method`` on resolved targets (:mod:`erasekit.targets`); returns an :class:`~erasekit.Erasure`.

    ``config`` is the method's config dataclass; or give ``preset`` and/or ``overrides``.
    Concepts are resolved into targets by :func:`erasekit.resolve.erase`, not here.

    Under several processes a data-parallel method returns the same erasure on every process; any
    other method runs on process 0 alone, every process returns when it is done, and the others
    get None (process 0 saves; see :func:`is_data_parallel`).
    """
    module = get_method(method)
    if config is None:
        config = build_config(method, preset, overrides)
    if distributed.is_distributed() and not is_data_parallel(method):
        distributed.start(model.device)
        with distributed.main_only() as main:
            return module.erase(model, list(targets), config=config, progress=progress) if main else None
    return module.erase(model, list(targets), config=config, progress=progress)
