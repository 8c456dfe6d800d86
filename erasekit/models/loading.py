"""``load_model``: Stable Diffusion 1.x/2.x, SDXL, or the toy model, into one ModelHandle."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from erasekit.errors import ErasekitError
from erasekit.models.handle import ModelHandle
from erasekit.models.toy import BUNDLED_TOY_DIR, is_toy_folder, load_toy
from erasekit.utils import atomic_folder

SUPPORTED = "Stable Diffusion 1.x/2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline) and the toy model ('toy')"
_SD_CLASSES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
_SDXL_CLASSES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}


def _pipeline_class(name_or_path: str) -> str:
    path = Path(name_or_path)
    index = path / "model_index.json"
    if path.exists():
        if not index.is_file():
            raise ErasekitError(
                f"{path} is not a diffusers model folder (no model_index.json); pass a folder saved with save_pretrained, a hub id, or 'toy'"
            )
        return json.loads(index.read_text()).get("_class_name", "")
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ErasekitError(f"model folder {name_or_path!r} does not exist; check the path, or pass a hub id such as CompVis/stable-diffusion-v1-4")
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(name_or_path)
    except Exception as error:  # network or hub errors: say what to do, not where it broke
        raise ErasekitError(f"could not fetch {name_or_path!r} from the hub ({type(error).__name__}); check the id and your connection, or pass a local folder") from error
    return config.get("_class_name", "")


def checked_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device that this machine has; one line otherwise."""
    try:
        device = torch.device(device or "cpu")
    except (RuntimeError, TypeError, ValueError):
        raise ErasekitError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ErasekitError(f"--device {device} asks for a GPU, but this torch sees none (CUDA is not available); use cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ErasekitError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ErasekitError("--device mps asks for Apple's GPU, but this torch cannot use it; use cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ErasekitError(f"unsupported device {device.type!r}; use cpu, cuda, cuda:N or mps")
    return device


def load_model(name_or_path: str = "toy", device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> ModelHandle:
    """Load a text-to-image model into a :class:`ModelHandle`.

    ``name_or_path`` is ``"toy"`` (the bundled toy model), a folder (a diffusers
    pipeline folder or a toy model folder) or a hub id. ``device`` defaults to the CPU
    and ``dtype`` to float32 (speed-ups are opt-in, as in diffusers).
    """
    device = checked_device(device)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(dtype)
        if dtype is None:
            raise ErasekitError("unknown dtype; use float32, float16 or bfloat16")
    dtype = dtype or torch.float32
    name_or_path = str(name_or_path)
    if name_or_path == "toy":
        return load_toy(BUNDLED_TOY_DIR, device, dtype)
    path = Path(name_or_path).expanduser()
    if path.is_dir() and is_toy_folder(path):
        return load_toy(path, device, dtype)
    class_name = _pipeline_class(str(path) if path.exists() else name_or_path)
    source = str(path) if path.exists() else name_or_path
    if class_name in _SD_CLASSES:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(source, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        kind = "sd"
    elif class_name in _SDXL_CLASSES:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(source, torch_dtype=dtype)
        kind = "sdxl"
    else:
        raise ErasekitError(f"{name_or_path} is a {class_name or 'unknown pipeline'}, which erasekit does not support yet; supported: {SUPPORTED}")
    pipe.to(device)
    for module in [pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]:
        if module is not None:
            module.requires_grad_(False).eval()
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if kind == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    return ModelHandle(
        kind=kind,
        name=name_or_path,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        tokenizers=tokenizers,
        text_encoders=encoders,
        vae=pipe.vae,
        max_length=pipe.tokenizer.model_max_length,
        default_guidance=5.0 if kind == "sdxl" else 7.5,
        default_steps=50,
        force_zeros_for_empty_prompt=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)) if kind == "sdxl" else False,
        pipeline=pipe,
    )


def save_pipeline(model: ModelHandle, folder: str | Path) -> Path:
    """Write the model, with every applied erasure merged in, as a plain diffusers (or toy) folder.

    Module erasures (Receler, CPE) cannot be folded into standard diffusers weights;
    they are refused with a clear error rather than silently dropped.
    """
    from erasekit.models.toy import write_toy_folder

    for erasure, _ in model.applied_erasures:
        if erasure.modules:
            raise ErasekitError(
                f"the {erasure.method} erasure adds modules that a plain diffusers folder cannot hold; save the erasure file and apply it at load time instead"
            )
    folder = Path(folder)
    if folder.exists():
        raise ErasekitError(f"{folder} already exists; choose a new folder")
    with atomic_folder(folder) as tmp:
        if model.kind == "toy":
            defaults = {"max_length": model.max_length, "guidance": model.default_guidance, "steps": model.default_steps}
            write_toy_folder(tmp, model.unet, extra=defaults)
        else:
            model.pipeline.save_pretrained(tmp, safe_serialization=True)
    return folder
