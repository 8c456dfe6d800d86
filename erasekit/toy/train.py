"""Train the toy text-to-image model (``erasekit toy train``).

Noise-prediction loss on fresh procedurally drawn images every step (the data is
infinite), 10% caption dropout for classifier-free guidance, min-SNR-5 loss
weighting (converges faster than the plain loss), AdamW with cosine decay, and
an EMA of the weights, which is what gets exported.

Checkpoints (``OUT/checkpoint/``) hold the trained and EMA weights, the optimizer
state and the data RNG state, all as safetensors/JSON, so ``--resume`` continues
exactly. At each checkpoint the EMA weights are also exported as a loadable toy
model folder (``OUT/model/``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from erasekit.models.toy import TOY_MAX_LENGTH, load_minilm, toy_scheduler_config, toy_unet_config, write_toy_folder
from erasekit.toy import world
from erasekit.utils import ErasekitError, atomic_folder


@dataclass
class ToyTrainConfig:
    """Settings of ``erasekit toy train``."""

    steps: int = field(default=3000, metadata={"help": "Optimiser steps.", "min": 1})
    batch_size: int = field(default=64, metadata={"help": "Freshly drawn images per step.", "min": 1})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate, after the warm-up.", "gt": 0})
    final_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate the cosine decay ends at.", "min": 0})
    warmup_steps: int = field(default=100, metadata={"help": "Steps of linear learning-rate warm-up.", "min": 0})
    ema_decay: float = field(default=0.999, metadata={"help": "Decay of the weights' EMA, which is what gets exported.", "min": 0, "max": 1})
    caption_dropout: float = field(default=0.1, metadata={
        "help": "Fraction of captions replaced by the empty prompt, for classifier-free guidance.", "min": 0, "max": 1})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "γ of min-SNR loss weighting.", "gt": 0})
    checkpoint_every: int = field(default=250, metadata={"help": "Steps between checkpoints.", "min": 1})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation and the data."})
    exclude: str = field(default="", metadata={
        "help": "Comma-separated toy concepts left out of the data (scenes holding one are drawn again): a model "
                "retrained without them, the reference an erasure of them is measured against."})


def excluded_concepts(config: ToyTrainConfig) -> list[tuple[str, str]]:
    """The (attribute, value) pairs ``config.exclude`` names; an ``ErasekitError`` if one is unknown or all of an attribute go."""
    pairs = sorted({world.parse_concept(word) for word in config.exclude.split(",") if word.strip()})
    for attribute, values in world.ATTRIBUTES.items():
        if sum(a == attribute for a, _ in pairs) >= len(values):
            raise ErasekitError(f"exclude={config.exclude!r} leaves no {attribute} to draw; keep at least one")
    return pairs


class CaptionCache:
    """MiniLM token states per caption; the caption set is finite, so each is encoded once."""

    def __init__(self, tokenizer, encoder):
        self.tokenizer, self.encoder, self.cache = tokenizer, encoder, {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self.cache})
        if missing:
            tokens = self.tokenizer(missing, padding="max_length", max_length=TOY_MAX_LENGTH, truncation=True, return_tensors="pt")
            states = self.encoder(**tokens).last_hidden_state
            self.cache.update(zip(missing, states))
        return torch.stack([self.cache[c] for c in captions])


def _learning_rate(config: ToyTrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.final_learning_rate + (config.learning_rate - config.final_learning_rate) * cosine


def _save_checkpoint(folder: Path, step: int, unet, ema, optimizer, rng, config) -> None:
    state = optimizer.state_dict()
    tensors = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    meta = {"step": step, "rng": rng.bit_generator.state, "config": asdict(config), "param_groups": state["param_groups"]}
    with atomic_folder(folder) as tmp:  # the previous checkpoint stays until this one is complete
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp / "unet.safetensors")
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta))


def _load_checkpoint(folder: Path, unet, ema, optimizer, rng) -> int:
    unet.load_state_dict(load_file(folder / "unet.safetensors"))
    ema.load_state_dict(load_file(folder / "ema.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(folder / "optimizer.safetensors")
    opt_state: dict = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    rng.bit_generator.state = meta["rng"]
    return int(meta["step"])


def train_toy_model(out: str | Path, config: ToyTrainConfig = ToyTrainConfig(), resume: bool = False, progress: bool = True) -> Path:
    """Train (or resume training) the toy model; returns the exported model folder ``OUT/model``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    out = Path(out)
    checkpoint = out / "checkpoint"
    exclude = excluded_concepts(config)
    existing = (checkpoint / "state.json").is_file()
    if existing and not resume:
        raise ErasekitError(f"{checkpoint} already holds a training run; --resume continues it, or train into another --out")
    if existing:
        saved = json.loads((checkpoint / "state.json").read_text())["config"]
        saved.setdefault("exclude", "")  # checkpoints from before the field
        changed = ", ".join(f"{k}={saved.get(k)!r} there, {v!r} here" for k, v in asdict(config).items()
                            if saved.get(k) != v and k != "checkpoint_every")  # the one setting that changes no weight
        if changed:
            raise ErasekitError(f"{checkpoint} was trained with other settings ({changed}); resume with those or train into another --out")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    tokenizer, encoder = load_minilm()
    captions = CaptionCache(tokenizer, encoder)
    unet = UNet2DConditionModel(**toy_unet_config(world.IMAGE_SIZE))
    ema = UNet2DConditionModel(**toy_unet_config(world.IMAGE_SIZE))
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    noise_schedule = DDPMScheduler(**toy_scheduler_config())
    alphas_cumprod = noise_schedule.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    start = 0
    if existing:
        start = _load_checkpoint(checkpoint, unet, ema, optimizer, rng)
    torch.manual_seed(config.seed + start)  # noise draws continue reproducibly after a resume

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="toy train", disable=not progress)
    for step in bar:
        images, _, batch_captions = world.sample_batch(config.batch_size, rng, exclude=exclude)
        batch_captions = ["" if rng.random() < config.caption_dropout else c for c in batch_captions]
        x0 = torch.from_numpy(images)
        states = captions(batch_captions)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (config.batch_size,))
        noise = torch.randn_like(x0)
        x_t = noise_schedule.add_noise(x0, noise, t)
        prediction = unet(x_t, t, encoder_hidden_states=states).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = torch.clamp(snr, max=config.min_snr_gamma) / snr
        loss = (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_checkpoint(checkpoint, done, unet, ema, optimizer, rng, config)
            write_toy_folder(out / "model", ema, {"train_steps": done, "train_config": asdict(config)})
    return out / "model"
