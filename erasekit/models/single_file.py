"""Single-file checkpoints: the one-``.safetensors`` layout of the original Stable Diffusion code (CompVis,
Stability's generative-models), which AUTOMATIC1111 and ComfyUI load.

Reading (:func:`erasekit.models.loading.load_model` calls the helpers here): :func:`detect_model_type`
tells SD 1.x, 2.x and SDXL apart by their key prefixes; diffusers' ``from_single_file`` then builds the
pipeline from a local config folder, the user's or one bundled in ``erasekit/data/single_file/``
(JSON configs only: the CLIP tokenizer files come from the user's folder or the local Hugging Face
cache, see :func:`find_clip_tokenizer`). Nothing is fetched from the network.

Writing: :func:`single_file_state_dict` renames a pipeline's weights into that layout:

* UNet under ``model.diffusion_model.``: down block i, layer j is ``input_blocks.{1 + i(L+1) + j}``
  (resnet ``.0``, transformer ``.1``), its downsampler ``input_blocks.{(i+1)(L+1)}.0.op``; the middle is
  ``middle_block.{0,1,2}``; up block i, layer j is ``output_blocks.{i(L+1) + j}``, its upsampler the
  last layer's ``.1.conv`` (``.2.conv`` after a transformer); L = layers_per_block.
* VAE under ``first_stage_model.``: ``down.i.block.j``, ``mid.block_{1,2}``, ``mid.attn_1`` (1x1 convs),
  decoder ``up`` blocks in reverse order.
* CLIP ViT-L (SD 1.x, SDXL's first encoder) under ``cond_stage_model.transformer.`` /
  ``conditioner.embedders.0.transformer.``, with transformers' own names; OpenCLIP (SD 2.x, SDXL's
  second encoder) under ``cond_stage_model.model.`` / ``conditioner.embedders.1.model.``, with q, k, v
  stacked into ``in_proj`` and the projection transposed. SD 2.x's encoder has the 23 layers a diffusers
  model keeps: the original's last layer and projection, which SD 2.x never uses, are not written.

Where diffusers' single-file converters import, every layout is checked against them: converting the
written keys back with diffusers must give exactly the pipeline's names and shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from erasekit.errors import ErasekitError

BUNDLED_CONFIGS = Path(__file__).resolve().parent.parent / "data" / "single_file"

# --model-type: what each bundled config folder is
MODEL_TYPES = {
    "sd1": "Stable Diffusion 1.x (512 px)",
    "sd2": "Stable Diffusion 2.x, 768 px v-prediction (2.0-v, 2.1)",
    "sd2-base": "Stable Diffusion 2.x base, 512 px (2.0-base, 2.1-base)",
    "sdxl": "SDXL base (1024 px)",
}
FAMILY = {"sd1": "sd1", "sd2": "sd2", "sd2-base": "sd2", "sdxl": "sdxl"}  # model type -> key layout
PICKLED_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

# the pad token of each tokenizer: CLIP ViT-L pads with <|endoftext|>, OpenCLIP with "!"
PAD_TOKENS = {
    "sd1": {"tokenizer": "<|endoftext|>"},
    "sd2": {"tokenizer": "!"},
    "sdxl": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
}

# (repository, folder) pairs of the local Hugging Face cache that hold the CLIP BPE tokenizer (every SD model uses it)
TOKENIZER_SOURCES = [
    ("openai/clip-vit-large-patch14", ""),
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer"),
    ("CompVis/stable-diffusion-v1-4", "tokenizer"),
    ("stabilityai/stable-diffusion-2-1", "tokenizer"),
    ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
]

_UNET_PREFIX = "model.diffusion_model."
_VAE_PREFIX = "first_stage_model."
_TEXT_PREFIXES = {
    "sd1": [("cond_stage_model.transformer.", "clip")],
    "sd2": [("cond_stage_model.model.", "openclip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "openclip")],
}


# ----------------------------------------------------------------------------------- reading
def pickled_file_error(path: Path) -> ErasekitError:
    return ErasekitError(
        f"{path} is a pickled checkpoint, which erasekit never loads (unpickling can run code); convert it once to "
        ".safetensors where you trust the file (torch.load(path, weights_only=True), then safetensors.torch.save_file) "
        "and pass that file"
    )


def detect_model_type(path: Path, keys: set[str], in_channels: int | None) -> str:
    """The model type of a single-file checkpoint from its keys (SD 2.x: the 768 px v-prediction type)."""
    if not any(k.startswith(_UNET_PREFIX) for k in keys):
        raise ErasekitError(f"{path} has no Stable Diffusion UNet ({_UNET_PREFIX}*); pass a full SD 1.x, 2.x or SDXL checkpoint")
    if in_channels is not None and in_channels != 4:
        raise ErasekitError(f"{path} is a UNet with {in_channels} input channels (inpainting or image-conditioned), "
                            "which erasekit does not support; pass a text-to-image checkpoint")
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.") for k in keys):
        raise ErasekitError(f"{path} is an SDXL refiner or another conditioner layout, which erasekit does not support; "
                            "pass an SD 1.x, 2.x or SDXL base checkpoint")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    raise ErasekitError(f"{path} holds a UNet but no text encoder erasekit recognises; pass --model-type "
                        f"({', '.join(MODEL_TYPES)}) with --model-config FOLDER, a diffusers folder of the same model")


def checked_model_type(model_type: str, detected: str, path: Path) -> str:
    """``model_type`` when it names one (and fits what the keys say); else the detected one."""
    if model_type is None:
        return detected
    if model_type not in MODEL_TYPES:
        raise ErasekitError(f"unknown --model-type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    if FAMILY[model_type] != FAMILY[detected]:
        raise ErasekitError(f"{path} has the keys of a {MODEL_TYPES[detected]} checkpoint, not {model_type}; "
                            f"pass --model-type {detected} or leave it out")
    return model_type


def find_clip_tokenizer() -> Path | None:
    """A folder of the local Hugging Face cache with CLIP's vocab.json and merges.txt, or None (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    for repo, folder in TOKENIZER_SOURCES:
        prefix = f"{folder}/" if folder else ""
        vocab = try_to_load_from_cache(repo, f"{prefix}vocab.json")
        if isinstance(vocab, str) and (Path(vocab).parent / "merges.txt").is_file():
            return Path(vocab).parent
    return None


def clip_tokenizers(model_type: str, folder: Path) -> dict:
    """The pipeline's tokenizers (``tokenizer``, and ``tokenizer_2`` for SDXL) from CLIP BPE files in ``folder``."""
    from transformers import CLIPTokenizer

    return {
        name: CLIPTokenizer.from_pretrained(str(folder), pad_token=pad, model_max_length=77, local_files_only=True)
        for name, pad in PAD_TOKENS[FAMILY[model_type]].items()
    }


# ----------------------------------------------------------------------------------- writing
_UNET_TABLE = {  # diffusers -> original names outside the blocks
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# OpenCLIP text transformer, diffusers -> original (the replacements diffusers' converter undoes)
_OPENCLIP_TABLE = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER_NAMES = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
                         ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn.", ".attn.")]


def _not_mappable(component: str, name: str) -> ErasekitError:
    return ErasekitError(f"the {component} parameter {name!r} has no place in the single-file layout; this architecture "
                         "is not an SD 1.x, 2.x or SDXL one: export --format diffusers instead")


def _unet_key(name: str, config) -> str:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise _not_mappable("UNet", name)
    module, _, leaf = name.rpartition(".")
    if module in _UNET_TABLE:
        return f"{_UNET_TABLE[module]}.{leaf}"
    parts = name.split(".")
    try:
        if parts[0] in ("down_blocks", "up_blocks"):
            block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if parts[0] == "down_blocks":
                first = 1 + block * (layers + 1)
                if kind == "downsamplers" and rest[0] == "conv":
                    return f"input_blocks.{first + layers}.0.op.{'.'.join(rest[1:])}"
                prefix = "input_blocks"
            else:
                first = block * (layers + 1)
                if kind == "upsamplers" and rest[0] == "conv":
                    after = 2 if "CrossAttn" in config["up_block_types"][block] else 1
                    return f"output_blocks.{first + layers}.{after}.conv.{'.'.join(rest[1:])}"
                prefix = "output_blocks"
            if kind == "resnets":
                return f"{prefix}.{first + index}.0.{_resnet_rest(rest)}"
            if kind == "attentions":
                return f"{prefix}.{first + index}.1.{'.'.join(rest)}"
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets" and index in (0, 1):
                return f"middle_block.{2 * index}.{_resnet_rest(rest)}"
            if kind == "attentions" and index == 0:
                return f"middle_block.1.{'.'.join(rest)}"
    except (IndexError, ValueError):
        pass
    raise _not_mappable("UNet", name)


def _resnet_rest(rest: list[str]) -> str:
    module, leaf = ".".join(rest[:-1]), rest[-1]
    if module not in _RESNET_NAMES:
        raise KeyError(module)
    return f"{_RESNET_NAMES[module]}.{leaf}"


def _vae_key(name: str, config) -> str:
    parts = name.split(".")
    if parts[0] not in ("encoder", "decoder"):
        if name.startswith(("quant_conv.", "post_quant_conv.")):
            return name
        raise _not_mappable("VAE", name)
    side, rest = parts[0], parts[1:]
    if rest[0] in ("conv_in", "conv_out"):
        return name
    if rest[0] == "conv_norm_out":
        return f"{side}.norm_out.{rest[1]}"
    try:
        if rest[0] in ("down_blocks", "up_blocks"):
            block = int(rest[1])
            if side == "decoder":
                block = len(config["up_block_types"]) - 1 - block  # the original counts decoder blocks from the bottom
            stage = "down" if side == "encoder" else "up"
            if rest[2] == "resnets":
                tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
                return f"{side}.{stage}.{block}.block.{rest[3]}.{tail}"
            if rest[2] in ("downsamplers", "upsamplers") and rest[4] == "conv":
                return f"{side}.{stage}.{block}.{stage}sample.conv.{rest[5]}"
        if rest[0] == "mid_block":
            if rest[1] == "resnets":
                tail = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
                return f"{side}.mid.block_{int(rest[2]) + 1}.{tail}"
            if rest[1] == "attentions" and rest[2] == "0":
                module, leaf = ".".join(rest[3:-1]), rest[-1]
                return f"{side}.mid.attn_1.{_VAE_ATTENTION_NAMES[module]}.{leaf}"
    except (IndexError, KeyError, ValueError):
        pass
    raise _not_mappable("VAE", name)


def _text_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' names with the ``text_model.`` prefix (CLIPTextModel drops it in recent transformers)."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"): v for k, v in state.items()}


def _openclip_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out, qkv = {}, {}
    for name, tensor in state.items():
        if name.endswith("position_ids"):
            continue
        if name == "text_projection.weight":
            out[f"{prefix}text_projection"] = tensor.T
            continue
        if name in _OPENCLIP_TABLE:
            out[prefix + _OPENCLIP_TABLE[name]] = tensor
            continue
        if not name.startswith("text_model.encoder.layers."):
            raise _not_mappable("text encoder", name)
        key = name
        for old, new in _OPENCLIP_LAYER_NAMES:
            key = key.replace(old, new)
        for which in ("q", "k", "v"):
            marker = f".attn.{which}_proj."
            if marker in key:
                head, leaf = key.split(marker)
                qkv.setdefault((head, leaf), {})[which] = tensor
                break
        else:
            out[prefix + key] = tensor
    for (head, leaf), parts in qkv.items():
        out[f"{prefix}{head}.attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def layout_of(kind: str, unet_config) -> str:
    """The single-file layout of a loaded SD/SDXL model: sdxl; sd2 (linear projections in the UNet); sd1."""
    if kind == "sdxl":
        return "sdxl"
    if kind == "sd":
        return "sd2" if unet_config.get("use_linear_projection") else "sd1"
    raise ErasekitError(f"the {kind} model has no single-file layout; export it with --format diffusers")


def single_file_state_dict(unet, vae, text_encoders: list, layout: str, check: bool = True) -> dict[str, torch.Tensor]:
    """The weights of an SD/SDXL pipeline under the original single-file names (tensors shared, not copied)."""
    if layout not in _TEXT_PREFIXES:
        raise ErasekitError(f"unknown single-file layout {layout!r}; use sd1, sd2 or sdxl")
    out = {_UNET_PREFIX + _unet_key(k, unet.config): v.detach() for k, v in unet.state_dict().items()}
    for name, tensor in vae.state_dict().items():
        key = _vae_key(name, vae.config)
        if ".mid.attn_1." in key and key.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the original's 1x1 convolutions
        out[_VAE_PREFIX + key] = tensor.detach()
    for (prefix, kind), encoder in zip(_TEXT_PREFIXES[layout], text_encoders, strict=True):
        state = _text_names({k: v.detach() for k, v in encoder.state_dict().items()})
        if kind == "clip":
            out.update({prefix + k: v for k, v in state.items() if not k.startswith("text_projection.")})
        else:
            out.update(_openclip_state(state, prefix))
    if check:
        check_against_diffusers(out, unet, vae, text_encoders, layout)
    return out


def check_against_diffusers(checkpoint: dict[str, torch.Tensor], unet, vae, text_encoders: list, layout: str) -> None:
    """Convert ``checkpoint``'s keys back with diffusers' own single-file converters (on shape-only tensors) and
    require the pipeline's exact names and shapes. Skipped where this diffusers has no such converters."""
    try:
        from diffusers.loaders.single_file_utils import (
            convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
            convert_open_clip_checkpoint,
        )
    except ImportError:
        return
    shapes = {k: torch.empty(v.shape, device="meta") for k, v in checkpoint.items()}
    expected = [("UNet", unet, convert_ldm_unet_checkpoint(shapes, dict(unet.config))),
                ("VAE", vae, convert_ldm_vae_checkpoint(shapes, dict(vae.config)))]
    for (prefix, kind), encoder in zip(_TEXT_PREFIXES[layout], text_encoders):
        mine = {k: v for k, v in shapes.items() if k.startswith(prefix)}
        if kind == "clip":
            converted = convert_ldm_clip_checkpoint(mine)
        else:
            converted = convert_open_clip_checkpoint(encoder, mine, prefix=prefix)
        expected.append(("text encoder", encoder, _text_names(converted)))
    for component, module, converted in expected:
        state = module.state_dict()
        if component == "text encoder":
            state = {k: v for k, v in _text_names(state).items() if not k.endswith("position_ids")}
            converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
            if layout != "sd1" and "text_projection.weight" in converted and "text_projection.weight" not in state:
                converted.pop("text_projection.weight")
        problem = None
        if set(converted) != set(state):
            problem = f"names differ: {sorted(set(converted) ^ set(state))[:3]}"
        else:
            bad = [k for k in state if tuple(converted[k].shape) != tuple(state[k].shape)]
            problem = f"shapes differ: {bad[:3]}" if bad else None
        if problem:
            raise ErasekitError(f"the single-file {component} layout does not convert back with this diffusers ({problem}); "
                                "export --format diffusers instead, and report this")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object; one line naming the file otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ErasekitError(f"{path} is not readable JSON ({type(error).__name__}); {what}") from None
    if not isinstance(value, dict):
        raise ErasekitError(f"{path} holds JSON {type(value).__name__}, not an object; {what}")
    return value
