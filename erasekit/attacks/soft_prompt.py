"""UnlearnDiffAtk (Zhang et al., ECCV 2024) and its soft-prompt variant.

The erased model itself is the classifier: target images of the concept come from the
**unerased** model for the prompt, and k learnable prefix tokens c' are optimised so that the
erased model θ* denoises them well (landscape.md, B1)::

    min_{c'}  E_{t, ε} || ε - ε_θ*( sqrt(ᾱ_t) x_tgt + sqrt(1 - ᾱ_t) ε, [c' ; c], t ) ||²

The outer loop walks ``timesteps`` uniformly spaced timesteps (high noise to low), with
``steps / timesteps`` AdamW steps at each (the spec: 5 tokens, 50 timesteps x 40 steps, lr 0.01,
weight decay 0.1). With ``early_stop`` an image is generated from the current prompt after each
timestep and the attack stops when the judge sees the concept.

``variant="hard"`` (the attack named ``unlearndiff``) keeps the tokens real: each forward pass
uses the nearest vocabulary tokens and passes the gradient straight through to the continuous
embeddings (PEZ-style projection; the reference code relaxes one-hot vectors instead), and the
result is a text prompt. ``variant="soft"`` (``soft-prompt``) keeps the optimised embeddings, an
upper bound on any discrete prompt.

On SDXL the prefix is optimised in both text encoders' input embeddings (k x 768 for
``text_encoder``, k x 1280 for ``text_encoder_2``, started from the same random tokens), so the
loss reaches the concatenated token states and the pooled ``text_embeds`` alike; the hard
variant projects each slot to one token id for both encoders (their vocabulary is shared).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from erasekit.attacks.base import AdversarialPrompt, Attack, AttackConfig, add_noise, denoising_target
from erasekit.models.tokens import (
    TokenProjector, candidate_token_ids, encode_ids, encode_slots, random_token_embeddings, template_text,
    tensors_per_encoder, token_template,
)
from erasekit.errors import ErasekitError
from erasekit.utils import sample_seed


@dataclass
class SoftPromptConfig(AttackConfig):
    """UnlearnDiffAtk's defaults (landscape.md, B1)."""

    variant: str = field(default="soft", metadata={
        "help": "soft: keep the optimised embeddings; hard: project them to real tokens (UnlearnDiffAtk).",
        "choices": ("soft", "hard")})
    tokens: int = field(default=5, metadata={"help": "Learnable prefix tokens.", "min": 1})
    steps: int = field(default=2000, metadata={"help": "AdamW steps in all, split evenly over the timesteps.", "min": 1})
    timesteps: int = field(default=50, metadata={
        "help": "Outer loop: uniformly spaced timesteps, from high noise to low.", "min": 1})
    learning_rate: float = field(default=0.01, metadata={"help": "AdamW learning rate of the prefix.", "gt": 0})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of the prefix.", "min": 0})
    target_images: int = field(default=1, metadata={"help": "Images of the concept drawn by the unerased model as targets.", "min": 1})
    early_stop: bool = field(default=True, metadata={
        "help": "After each timestep generate from the current prompt and stop once the judge sees the concept."})


class SoftPromptAttack(Attack):
    name = "soft-prompt"
    config_class = SoftPromptConfig

    def prepare(self, run) -> None:
        if self.config.variant not in ("soft", "hard"):
            raise ErasekitError(f"variant={self.config.variant!r}; use 'soft' (embeddings) or 'hard' (tokens)")
        if self.config.tokens < 1 or self.config.steps < 1:
            raise ErasekitError("soft-prompt needs tokens >= 1 and steps >= 1")
        self.candidates = candidate_token_ids(run.model)
        self.projector = TokenProjector(run.model, self.candidates) if self.config.variant == "hard" else None

    def _conditioning(self, run, template, prefix):
        with torch.no_grad():
            if self.config.variant == "soft":
                return encode_slots(run.model, template, prefix), None, None
            ids = self.projector.straight_through(prefix)[1]
            hard = template.with_slot_ids(ids)
            return encode_ids(run.model, hard.input_ids, hard.attention_mask), template_text(run.model, hard), ids

    def attack_prompt(self, run, prompt: str, index: int) -> AdversarialPrompt:
        model, config = run.model, self.config
        generator = run.generator(index)
        target_seeds = [sample_seed(run.seed, index, 1000 + k) for k in range(config.target_images)]
        with model.erasures_off():
            targets = run.generate(model.encode([prompt]), target_seeds, return_latents=True)
        template = token_template(model, prompt, prefix=config.tokens)
        prefix = [e.requires_grad_(True) for e in random_token_embeddings(model, config.tokens, self.candidates, generator)]
        optimizer = torch.optim.AdamW(prefix, lr=config.learning_rate, weight_decay=config.weight_decay)
        outer = min(config.timesteps, config.steps)
        inner = max(1, config.steps // outer)
        last = model.scheduler.config.num_train_timesteps - 1
        timesteps = torch.linspace(last, 0, outer).round().long()
        losses, steps_run, stopped_by = [], 0, None
        bar = tqdm(total=outer * inner, desc=self.name, disable=not run.progress, leave=False)
        for t in timesteps:
            for _ in range(inner):
                noise = torch.randn(targets.shape, generator=generator).to(targets.device, targets.dtype)
                t_batch = t.repeat(len(targets)).to(targets.device)
                x_t = add_noise(model, targets, noise, t_batch)
                used = prefix if config.variant == "soft" else self.projector.straight_through(prefix)[0]
                cond = encode_slots(model, template, [e.to(model.dtype) for e in used]).repeat(len(targets))
                loss = F.mse_loss(model.predict_noise(x_t, t_batch, cond).float(), denoising_target(model, targets, noise, t_batch).float())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                steps_run += 1
                bar.update(1)
            if config.early_stop and run.check(self._conditioning(run, template, prefix)[0], index):
                stopped_by = "success"
                break
            if run.out_of_time():
                stopped_by = "time budget"
                break
        bar.close()
        cond, text, ids = self._conditioning(run, template, prefix)
        tensors = {**tensors_per_encoder("prefix_embeddings", [e.detach().float() for e in prefix]), "template_ids": template.input_ids}
        if ids is not None:
            tensors["prefix_ids"] = ids
        info = {"variant": config.variant, "steps_run": steps_run, "stopped_by": stopped_by,
                "first_loss": losses[0] if losses else None, "last_loss": sum(losses[-inner:]) / max(1, len(losses[-inner:]))}
        return AdversarialPrompt(cond, text=text, tensors=tensors, info=info)


class UnlearnDiffAttack(SoftPromptAttack):
    """UnlearnDiffAtk proper: the hard (real-token) variant."""

    name = "unlearndiff"
    config_defaults = {"variant": "hard"}
