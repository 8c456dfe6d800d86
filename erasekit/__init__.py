"""erasekit: erase concepts from text-to-image diffusion models, prove they are gone, attack them.

    import erasekit
    model = erasekit.load_model("toy")
    erasure = erasekit.erase(model, "uce", ["triangle"])
    erasure.save("triangle.safetensors")
    erasure.apply(model)           # ... generate, evaluate ...
    erasure.remove(model)          # the original weights, exactly
"""

__version__ = "0.1.0"

from erasekit.errors import ErasekitError
from erasekit.erasure import Erasure, apply_erasures
from erasekit.models.handle import Conditioning, ModelHandle
from erasekit.models.loading import load_model, save_pipeline
from erasekit.methods import erase

__all__ = [
    "Conditioning", "Erasure", "ErasekitError", "ModelHandle", "apply_erasures", "erase", "load_model", "save_pipeline",
]
