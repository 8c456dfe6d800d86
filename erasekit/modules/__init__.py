"""Added modules at inference time: what an erasure's ``module.*`` tensors become on a model.

``MODULE_ERASURES`` maps an erasure's ``module_type`` to a handler class with
``attach(model, erasure, scale)`` and ``detach(model, erasure)``; ``Erasure.apply`` / ``remove``
call them. Training code lives in :mod:`erasekit.methods`; this package must not import it.
"""

from __future__ import annotations

from erasekit.modules.cpe import CPEModules
from erasekit.modules.receler import RecelerModules

# module_type (as saved in the erasure file) -> handler class
MODULE_ERASURES: dict[str, type] = {
    "receler": RecelerModules,
    "cpe": CPEModules,
}


def register_module_erasure(module_type: str):
    """Class decorator adding a handler for another ``module_type``."""

    def decorator(cls):
        MODULE_ERASURES[module_type] = cls
        return cls

    return decorator


__all__ = ["CPEModules", "MODULE_ERASURES", "RecelerModules", "register_module_erasure"]
