"""The Stable Diffusion 1.4 and SDXL pipelines of ``benchmarks/gpu.py``: real configs, random weights, no downloads.

Every component is built from its published config, written out below as dicts:

* SD 1.4: ``CompVis/stable-diffusion-v1-4`` ``unet/config.json`` (:data:`sd14.SD14_UNET_CONFIG`), ``vae/config.json``,
  ``text_encoder/config.json`` (CLIP ViT-L/14's text tower) and its PNDM ``scheduler_config.json``;
* SDXL: ``stabilityai/stable-diffusion-xl-base-1.0`` ``unet``, ``vae``, ``text_encoder`` (CLIP ViT-L/14),
  ``text_encoder_2`` (OpenCLIP ViT-bigG/14 with projection) and its Euler scheduler.

The tokenizer is the only part that is not the real one: CLIP's BPE files are not bundled, so
:func:`write_tokenizer_files` writes a CLIP BPE vocabulary that spells every word of erasekit's bundled
prompt lists (templates, anchors) in one or a few tokens, and any other word letter by letter. erasekit pads
every prompt to the text encoder's 77 positions, so the timings do not depend on the exact split.

``TINY`` holds configs of the same architectures a few thousand times smaller, for ``--dry-run`` on a CPU.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from sd14 import SD14_UNET_CONFIG

DATA = Path(__file__).resolve().parent.parent / "erasekit" / "data"

# CompVis/stable-diffusion-v1-4 (and SD 1.5): vae/config.json
SD14_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu",
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)
# text_encoder/config.json: CLIP ViT-L/14's text transformer
CLIP_L_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
)
# scheduler/scheduler_config.json
SD14_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
    set_alpha_to_one=False, steps_offset=1, clip_sample=False,
)

# stabilityai/stable-diffusion-xl-base-1.0: unet/config.json
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, upcast_attention=False,
)
# vae/config.json (the SDXL VAE: SD's architecture, another scaling factor, upcast to float32 for decoding)
SDXL_VAE_CONFIG = dict(SD14_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
# text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text transformer with its projection
CLIP_BIGG_CONFIG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
)
# scheduler/scheduler_config.json
SDXL_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
    steps_offset=1, interpolation_type="linear", use_karras_sigmas=False,
)

REAL = {
    "sd14": {"unet": SD14_UNET_CONFIG, "vae": SD14_VAE_CONFIG, "text_encoder": CLIP_L_CONFIG,
             "scheduler": SD14_SCHEDULER_CONFIG},
    "sdxl": {"unet": SDXL_UNET_CONFIG, "vae": SDXL_VAE_CONFIG, "text_encoder": CLIP_L_CONFIG, "text_encoder_2": CLIP_BIGG_CONFIG,
             "scheduler": SDXL_SCHEDULER_CONFIG},
}

# --dry-run: the same architectures, tiny (16 px images on a 2x VAE, 32-wide text encoders)
_TINY_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=32)
_TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                 sample_size=16, scaling_factor=0.18215)
TINY = {
    "sd14": {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        "vae": _TINY_VAE, "text_encoder": _TINY_TEXT, "scheduler": SD14_SCHEDULER_CONFIG,
    },
    "sdxl": {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
                     cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8),
        "vae": dict(_TINY_VAE, force_upcast=True), "text_encoder": _TINY_TEXT, "text_encoder_2": _TINY_TEXT,
        "scheduler": SDXL_SCHEDULER_CONFIG,
    },
}


# ------------------------------------------------------------------------------------- tokenizer
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"
PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def bundled_words(extra: str = "") -> list[str]:
    """Every lower-case word of erasekit's bundled prompt lists (and of ``extra``), in first-seen order."""
    text = " ".join(path.read_text(encoding="utf-8") for path in sorted(DATA.glob("*.txt"))) + " " + extra
    return list(dict.fromkeys(re.findall(r"[a-z]+", text.lower())))


def write_tokenizer_files(folder: Path, extra: str = "") -> Path:
    """``vocab.json`` and ``merges.txt`` of a CLIP BPE vocabulary: each bundled word a token (built left to right)."""
    merges: dict[str, None] = {}
    for word in bundled_words(extra):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges[f"{symbols[0]} {symbols[1]}"] = None
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    tokens = SPECIAL + list(LETTERS) + [c + "</w>" for c in LETTERS] + list(PUNCTUATION) + [p + "</w>" for p in PUNCTUATION]
    tokens += [merge.replace(" ", "") for merge in merges]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    if len(vocab) > CLIP_L_CONFIG["vocab_size"]:
        raise ValueError(f"the bench vocabulary has {len(vocab)} tokens, more than CLIP's {CLIP_L_CONFIG['vocab_size']}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def make_tokenizer(folder: Path, pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token=pad_token)


# --------------------------------------------------------------------------------------- pipeline
def _text_encoder(config: dict, tokenizer, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(text_config)


def build_pipeline(kind: str, configs: dict, device: str, tokenizer_folder: Path, seed: int = 0):
    """A StableDiffusionPipeline ("sd14") or StableDiffusionXLPipeline ("sdxl") with random weights, built on ``device``."""
    from diffusers import (
        AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(tokenizer_folder, "<|endoftext|>")
    with torch.device(device):  # random weights made where they are used (SDXL's 3.5 B values in seconds on a GPU)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = _text_encoder(configs["text_encoder"], tokenizer, with_projection=False)
        if kind == "sdxl":
            tokenizer_2 = make_tokenizer(tokenizer_folder, "!")
            text_encoder_2 = _text_encoder(configs["text_encoder_2"], tokenizer_2, with_projection=True)
    for module in (unet, vae, text_encoder, *([text_encoder_2] if kind == "sdxl" else [])):
        module.requires_grad_(False).eval()
    if kind == "sd14":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler.from_config(configs["scheduler"]),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]), add_watermarker=False,
    )
