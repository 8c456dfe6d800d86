"""erasekit: erase concepts from text-to-image diffusion models, prove they are gone, attack them.

    import erasekit
    model = erasekit.load_model("toy")
    erasure = erasekit.erase(model, "uce", ["triangle"])
    erasure.save("triangle.safetensors")
    erasure.apply(model)           # ... generate, evaluate ...
    erasure.remove(model)          # the original weights, exactly
    erasekit.export(model, ["triangle.safetensors"], "erased", format="diffusers")  # or "lora", "single-file"
"""

from erasekit.errors import ErasekitError
from erasekit.version import __version__
from erasekit.erasure import Erasure, apply_erasures
from erasekit.models.handle import Conditioning, ModelHandle
from erasekit.models.loading import load_model, save_pipeline
from erasekit.resolve import erase, resolve_targets
from erasekit.export import apply, export, remove  # erasekit.export is the function; its module: from erasekit.export import ...

__all__ = [
    "Conditioning", "Erasure", "ErasekitError", "ModelHandle", "apply", "apply_erasures", "erase", "export", "load_model",
    "remove", "resolve_targets", "save_pipeline", "__version__",
]
