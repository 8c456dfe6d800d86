"""``load_model``: Stable Diffusion 1.x/2.x, SDXL, or the toy model, into one ModelHandle.

Weights are read from safetensors only: a diffusers folder whose weights are pickled ``.bin`` files, and a
pickled ``.ckpt``/``.pt`` checkpoint, are refused with the way to convert them. Single-file ``.safetensors``
checkpoints go through diffusers' ``from_single_file`` with a local config (:mod:`erasekit.models.single_file`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from erasekit.errors import ErasekitError
from erasekit.models.handle import ModelHandle
from erasekit.models.single_file import (
    BUNDLED_CONFIGS, FAMILY, MODEL_TYPES, PAD_TOKENS, PICKLED_SUFFIXES, checked_model_type, clip_tokenizers,
    detect_model_type, find_clip_tokenizer, pickled_file_error, read_json_object,
)
from erasekit.models.toy import BUNDLED_TOY_DIR, is_toy_folder, load_toy
from erasekit.utils import atomic_folder

SUPPORTED = "Stable Diffusion 1.x/2.x (StableDiffusionPipeline), SDXL (StableDiffusionXLPipeline) and the toy model ('toy')"
_SD_CLASSES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
_SDXL_CLASSES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
_WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _listed(index: dict, name: str) -> bool:
    """Whether model_index.json lists ``name`` as a component to load (``[library, class]``, not ``[null, null]``)."""
    value = index.get(name)
    return isinstance(value, list) and len(value) == 2 and bool(value[0]) and bool(value[1])


def read_model_index(folder: Path) -> dict:
    """A diffusers folder's model_index.json, checked: a JSON object, and every component it lists has its sub-folder."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ErasekitError(
            f"{folder} is not a diffusers model folder (no model_index.json); pass a folder saved with save_pretrained, a hub id, or 'toy'"
        )
    data = read_json_object(index, "save the model again with save_pretrained, or copy its folder again")
    if not isinstance(data.get("_class_name", ""), str):
        raise ErasekitError(f"{index}: _class_name is not a pipeline class name; save the model again with save_pretrained")
    for name in data:
        if not name.startswith("_") and _listed(data, name) and not (folder / name).is_dir():
            raise ErasekitError(f"{folder} lists {name!r} in model_index.json but has no {name}/ folder; copy the whole model folder")
    return data


def _check_safetensors_weights(folder: Path, index: dict) -> None:
    """Refuse a folder whose weights are only pickled (.bin): loading them would unpickle."""
    for name in _WEIGHT_COMPONENTS:
        if not _listed(index, name) or any((folder / name).glob("*.safetensors")):
            continue
        if any((folder / name).glob("*.bin")):
            raise ErasekitError(
                f"{folder / name} holds only pickled .bin weights, which erasekit never loads (unpickling can run code); "
                "convert the folder once where you trust it with DiffusionPipeline.from_pretrained(FOLDER).save_pretrained(NEW) "
                "(it writes safetensors) and pass NEW"
            )
        raise ErasekitError(f"{folder / name} has no .safetensors weights; the folder is incomplete: copy the whole model folder")


def _pipeline_class(name_or_path: str) -> str:
    path = Path(name_or_path)
    if path.exists():
        index = read_model_index(path)
        if index.get("_class_name") in _SD_CLASSES | _SDXL_CLASSES:
            _check_safetensors_weights(path, index)
        return index.get("_class_name", "")
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


def _dtype_argument(dtype: torch.dtype) -> dict:
    """diffusers' dtype keyword: ``dtype`` where this diffusers has it (``torch_dtype`` is deprecated there), else ``torch_dtype``."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def load_model(name_or_path: str = "toy", device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
               model_type: str | None = None, config: str | Path | None = None) -> ModelHandle:
    """Load a text-to-image model into a :class:`ModelHandle`.

    ``name_or_path`` is ``"toy"`` (the bundled toy model), a folder (a diffusers pipeline folder or a toy
    model folder), a single-file ``.safetensors`` checkpoint (SD 1.x, 2.x or SDXL) or a hub id. ``device``
    defaults to the CPU and ``dtype`` to float32 (speed-ups are opt-in, as in diffusers). For a single-file
    checkpoint, ``model_type`` (one of :data:`~erasekit.models.single_file.MODEL_TYPES`) overrides the
    detected type and ``config`` names a local diffusers folder of the same model to take configs and
    tokenizers from (default: the bundled configs, tokenizers from the local Hugging Face cache).
    """
    device = checked_device(device)
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                 "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}.get(dtype)
        if dtype is None:
            raise ErasekitError("unknown dtype; use float32, float16 or bfloat16")
    dtype = dtype or torch.float32
    name_or_path = str(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix.lower() in PICKLED_SUFFIXES:
            raise pickled_file_error(path)
        if path.suffix.lower() != ".safetensors":
            raise ErasekitError(f"{path} is a file but not a .safetensors checkpoint; pass a single-file .safetensors "
                                "checkpoint, a diffusers folder, a hub id or 'toy'")
        pipe, kind = _load_single_file(path, model_type, config, dtype)
        return _ready(pipe, kind, name_or_path, device)
    if model_type is not None or config is not None:
        raise ErasekitError(f"--model-type and --model-config are for single-file checkpoints, and {name_or_path} is not "
                            "a .safetensors file; leave them out")
    if name_or_path == "toy":
        return load_toy(BUNDLED_TOY_DIR, device, dtype)
    if path.is_dir() and is_toy_folder(path):
        return load_toy(path, device, dtype)
    class_name = _pipeline_class(str(path) if path.exists() else name_or_path)
    source = str(path) if path.exists() else name_or_path
    options = {**_dtype_argument(dtype), "use_safetensors": True}
    try:
        if class_name in _SD_CLASSES:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False, **options)
            kind = "sd"
        elif class_name in _SDXL_CLASSES:
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline.from_pretrained(source, **options)
            kind = "sdxl"
        else:
            raise ErasekitError(f"{name_or_path} is a {class_name or 'unknown pipeline'}, which erasekit does not support yet; supported: {SUPPORTED}")
    except (OSError, ValueError) as error:  # e.g. a hub model without safetensors weights
        raise ErasekitError(f"diffusers could not load {name_or_path} ({type(error).__name__}: {_first_line(error)}); "
                            "pass a diffusers folder with safetensors weights") from error
    return _ready(pipe, kind, name_or_path, device)


def _ready(pipe, kind: str, name: str, device: torch.device) -> ModelHandle:
    """A freshly loaded pipeline on ``device``, frozen, in a handle."""
    pipe.to(device)
    for module in [pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]:
        if module is not None:
            module.requires_grad_(False).eval()
    return handle_from_pipeline(pipe, name, kind)


def pipeline_kind(pipe) -> str:
    """"sd" or "sdxl" for a diffusers Stable Diffusion (XL) pipeline object; one line otherwise."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    if names & _SDXL_CLASSES:
        return "sdxl"
    if names & _SD_CLASSES:
        return "sd"
    raise ErasekitError(f"a {type(pipe).__name__} is not a pipeline erasekit supports; supported: {SUPPORTED}")


def handle_from_pipeline(pipe, name: str | None = None, kind: str | None = None) -> ModelHandle:
    """A :class:`ModelHandle` over a diffusers pipeline's own modules (nothing copied: erasures applied to the
    handle change the pipeline)."""
    kind = kind or pipeline_kind(pipe)
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if kind == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    return ModelHandle(
        kind=kind,
        name=name or str(getattr(pipe, "name_or_path", None) or type(pipe).__name__),
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


def _load_single_file(path: Path, model_type: str | None, config, dtype: torch.dtype):
    """A single-file .safetensors checkpoint through diffusers' ``from_single_file``, with a local config folder."""
    from safetensors import safe_open

    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            in_channels = f.get_slice(unet_in).get_shape()[1] if unet_in in keys else None
    except Exception as error:  # safetensors raises its own error types for a damaged header
        raise ErasekitError(f"{path} is not a readable safetensors file ({type(error).__name__}); pass a single-file "
                            "checkpoint or a diffusers folder") from None
    model_type = checked_model_type(model_type, detect_model_type(path, keys, in_channels), path)
    family = FAMILY[model_type]
    if config is not None:
        folder = Path(config).expanduser()
        if not folder.is_dir():
            raise ErasekitError(f"--model-config {folder} is not a folder; pass a local diffusers folder of the same model type")
        index = read_model_index(folder)
        folder_family = "sdxl" if index.get("_class_name") in _SDXL_CLASSES else "sd" if index.get("_class_name") in _SD_CLASSES else None
        if folder_family != ("sdxl" if family == "sdxl" else "sd"):
            raise ErasekitError(f"--model-config {folder} is a {index.get('_class_name') or 'unknown pipeline'} folder but {path} "
                                f"is a {MODEL_TYPES[model_type]} checkpoint; pass a folder of the same model type")
    else:
        folder = BUNDLED_CONFIGS / model_type
        index = read_model_index(folder)
    tokenizers = {}
    missing = [name for name in PAD_TOKENS[family] if not _listed(index, name)]
    if missing:
        source = find_clip_tokenizer()
        if source is None:
            raise ErasekitError(
                f"loading {path} needs CLIP's tokenizer files, which erasekit does not bundle and the local Hugging Face cache "
                "lacks; pass --model-config FOLDER (a local diffusers folder of the same model type), or fetch them once "
                "with: hf download openai/clip-vit-large-patch14 vocab.json merges.txt"
            )
        tokenizers = {name: t for name, t in clip_tokenizers(model_type, source).items() if name in missing}
    extra = {"safety_checker": None, "requires_safety_checker": False} if family != "sdxl" else {}
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    try:
        with _quiet("diffusers.models.modeling_utils"):  # its float32-modules notice fires on every dtype, listing none
            pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **_dtype_argument(dtype),
                                        **tokenizers, **extra)
    except Exception as error:  # diffusers' many error types: name it in one line
        raise ErasekitError(f"diffusers could not build a {MODEL_TYPES[model_type]} pipeline from {path} "
                            f"({type(error).__name__}: {_first_line(error)}); if it is another model, pass --model-type "
                            "or --model-config FOLDER") from error
    for name in _WEIGHT_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is not None and any(p.is_meta for p in module.parameters()):
            raise ErasekitError(f"{path} lacks weights for the {name} of a {MODEL_TYPES[model_type]} model; pass a complete "
                                "checkpoint, or --model-type / --model-config FOLDER if it is another model")
    return pipe, ("sdxl" if family == "sdxl" else "sd")


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Leave out one logger's warnings for a while (its errors still show)."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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
