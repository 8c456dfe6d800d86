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
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from erasekit.models.toy import TOY_MAX_LENGTH, load_minilm, toy_scheduler_config, toy_unet_config, write_toy_folder
from erasekit.toy import world


@dataclass
class ToyTrainConfig:
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 1e-3
    final_learning_rate: float = 1e-4
    warmup_steps: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 250
    seed: int = 0


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
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, tmp / "unet.safetensors")
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    state = optimizer.state_dict()
    tensors = {}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"{index}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    save_file(tensors, tmp / "optimizer.safetensors")
    meta = {"step": step, "rng": rng.bit_generator.state, "config": asdict(config), "param_groups": state["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(meta))
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    os.replace(tmp, folder)


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
    if resume and (checkpoint / "state.json").is_file():
        start = _load_checkpoint(checkpoint, unet, ema, optimizer, rng)
    torch.manual_seed(config.seed + start)  # noise draws continue reproducibly after a resume

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="toy train", disable=not progress)
    for step in bar:
        images, _, batch_captions = world.sample_batch(config.batch_size, rng)
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
