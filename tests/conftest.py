"""Tiny models built from configs, saved once per test session.

Nothing here downloads anything: the UNets, VAEs and CLIP text encoders are built from
small configs with random weights (the way diffusers' own tests build theirs), and the
CLIP tokenizer is made from a vocab.json and merges.txt written below. Each fixture
returns the folder, so tests load it the way users do: ``erasekit.load_model(folder)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# Words the tiny CLIP tokenizer knows as single tokens ("<word></w>"). Any other word
# is spelled out letter by letter, which the tests use for multi-token words.
WORDS = ["a", "of", "photo", "red", "blue", "triangle", "circle", "cat", "painting", "in", "style", "the"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
PUNCTUATION = ["!", ",", "."]

TEXT_HIDDEN = 32  # hidden size of every tiny CLIP text encoder
TEXT_PROJECTION = 32  # SDXL's text_encoder_2 projection (the pooled text_embeds)
SDXL_TIME_EMBED = 8  # addition_time_embed_dim


def _word_merges(word: str) -> list[str]:
    """The BPE merges that build ``word`` left to right: "r e", "re d</w>" for "red"."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    while len(symbols) > 1:
        merges.append(f"{symbols[0]} {symbols[1]}")
        symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return merges


def write_clip_vocab(folder: Path) -> Path:
    """Write vocab.json and merges.txt of a small CLIP BPE vocabulary into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    merges: list[str] = []
    for word in WORDS:
        for merge in _word_merges(word):
            if merge not in merges:
                merges.append(merge)
    tokens = list(SPECIAL) + list(LETTERS) + [c + "</w>" for c in LETTERS]
    tokens += PUNCTUATION + [p + "</w>" for p in PUNCTUATION]
    tokens += [m.replace(" ", "") for m in merges]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def make_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, pad_token=pad_token)
    for word in WORDS:  # the vocabulary is what the tests assume it is
        assert tokenizer.convert_ids_to_tokens(tokenizer(word, add_special_tokens=False)["input_ids"]) == [word + "</w>"], word
    return tokenizer


def make_text_encoder(tokenizer, seed: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_PROJECTION, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def make_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8, sample_size=16,
    )


# The tiny SD UNet: 1 cross-attention layer in the down block, 1 in the middle, 2 in the
# up block (layers_per_block + 1), so 4 attn2 modules.
SD_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=8,
)

SDXL_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
    cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED,
    projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + TEXT_PROJECTION, norm_num_groups=8,
)


def build_tiny_sd(folder: Path, vocab_folder: Path, seed: int = 0) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD_UNET_CONFIG)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    tokenizer = make_tokenizer(vocab_folder)
    pipe = StableDiffusionPipeline(
        vae=make_vae(seed + 1), text_encoder=make_text_encoder(tokenizer, seed + 2), tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sdxl(folder: Path, vocab_folder: Path, seed: int = 0) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
    )
    tokenizer = make_tokenizer(vocab_folder)
    tokenizer_2 = make_tokenizer(vocab_folder, pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=make_vae(seed + 1), text_encoder=make_text_encoder(tokenizer, seed + 2),
        text_encoder_2=make_text_encoder(tokenizer_2, seed + 3, with_projection=True), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_clip(root: Path, logit_scale: float | None = None) -> Path:
    """A tiny CLIPModel (random towers, seed 0) and its processor, on the vocabulary above, in ``root/clip``."""
    import numpy as np
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = make_tokenizer(write_clip_vocab(root / "vocab"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16, **({} if logit_scale is None else {"logit_scale_init_value": float(np.log(logit_scale))}),
    )
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(root / "clip", safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    return root / "clip"


@pytest.fixture(scope="session")
def clip_vocab_folder(tmp_path_factory) -> Path:
    return write_clip_vocab(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory, clip_vocab_folder) -> Path:
    """A tiny Stable Diffusion 1.x pipeline folder (DDIM scheduler, 16x16 images)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), clip_vocab_folder, seed=0)


@pytest.fixture(scope="session")
def tiny_sd_other_folder(tmp_path_factory, clip_vocab_folder) -> Path:
    """The same architecture as ``tiny_sd_folder`` with other random weights (another base model)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_other"), clip_vocab_folder, seed=100)


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory, clip_vocab_folder) -> Path:
    """A tiny SDXL pipeline folder: two text encoders, text_time added conditioning."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), clip_vocab_folder, seed=0)


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory) -> Path:
    """A toy model folder (erasekit's pixel-space UNet on MiniLM) with random weights."""
    from diffusers import UNet2DConditionModel

    from erasekit.models.toy import toy_unet_config, write_toy_folder

    folder = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    write_toy_folder(folder, UNet2DConditionModel(**toy_unet_config()))
    return folder


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory) -> Path:
    """A folder whose model_index.json names a pipeline erasekit does not support."""
    folder = tmp_path_factory.mktemp("sd3")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.30.0"}))
    return folder


def assert_same_picture(a: torch.Tensor, b: torch.Tensor, max_changed: float = 0.01) -> None:
    """Two generations of the same prompt and seed show the same picture.

    CPU float kernels depend on the thread count and the batch size, so the same seed does
    not give bit-identical floats in a batch of one and a batch of three. Measured on the
    toy model (6 seeds, batch 1 vs 3, at 1, 2 and 4 torch threads): at most 1.7e-4 apart,
    at most one 8-bit level, on at most 0.2% of pixels. So: in 8 bits, every pixel within
    one level and at most ``max_changed`` of them changed at all.
    """
    assert a.shape == b.shape, (a.shape, b.shape)
    a8, b8 = (a.float() * 255).round(), (b.float() * 255).round()
    levels = (a8 - b8).abs()
    assert levels.max() <= 1, f"pixels differ by up to {int(levels.max())} 8-bit levels"
    changed = (levels > 0).float().mean().item()
    assert changed <= max_changed, f"{changed:.2%} of the 8-bit values changed"


def cli_error(capsys, argv) -> str:
    """Run the CLI in-process on bad input: exit status 2 and exactly one ``erasekit: error:`` line; returns it."""
    from erasekit.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("erasekit: error: ")
    return err
