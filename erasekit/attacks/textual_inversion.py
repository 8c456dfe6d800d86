"""Concept Inversion, CCE (Pham et al., ICLR 2024): textual inversion on the erased model.

A new token v* is learned so that the **erased** model (frozen) denoises images of the concept
made by the **unerased** model, prompted with the concept's word replaced by v*
(landscape.md, B4)::

    min_{v*}  E_{x, t, ε} || ε - ε_θ*(x_t, "... <v*> ...", t) ||²

v* is an input token embedding (it goes through the text encoder like any word), initialised
from ``initializer``'s embedding. It is learned once per run on ``images`` concept images, kept
in ``OUT/textual_inversion.safetensors`` (a rerun reuses it) and then every attacked prompt is
given with the concept's word replaced by v* (prefixed when the word does not occur). Defaults
are CCE's: 5000 steps, batch 4 x gradient accumulation 4, lr 5e-3, 25 images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from erasekit.attacks.base import AdversarialPrompt, Attack, AttackConfig, add_noise, denoising_target, sample_seed
from erasekit.attacks.text import encode_slots, input_embedding_matrix, token_template, word_ids
from erasekit.errors import ErasekitError
from erasekit.models.handle import Conditioning


@dataclass
class TextualInversionConfig(AttackConfig):
    """CCE's defaults (landscape.md, B4)."""

    steps: int = 5000  # optimiser steps
    batch_size: int = 4
    gradient_accumulation: int = 4
    learning_rate: float = 5e-3
    images: int = 25  # concept images from the unerased model
    initializer: str | None = None  # v*'s start: this word's first token (None: "shape" on the toy model, "art" elsewhere)
    concept_word: str | None = None  # the word v* replaces in the prompts (None: the concept)
    training_prompts: list | None = None  # prompts of the concept images (None: the attacked prompts)


class TextualInversionAttack(Attack):
    name = "textual-inversion"
    config_class = TextualInversionConfig

    def prepare(self, run) -> None:
        config, model = self.config, run.model
        if config.steps < 0 or config.batch_size < 1 or config.gradient_accumulation < 1 or config.images < 1:
            raise ErasekitError("textual-inversion needs steps >= 0, batch_size >= 1, gradient_accumulation >= 1, images >= 1")
        if model.kind == "sdxl":
            raise ErasekitError("textual-inversion is not supported for SDXL yet (two text encoders); use closed-form, ring-a-bell or paraphrase")
        self.word = config.concept_word or run.concept
        saved = run.artifact_path("textual_inversion.safetensors")
        if saved is not None and saved.is_file():
            self.embedding = load_file(str(saved))["embedding"].to(model.device)
            self.info = {"steps_run": None, "reused": str(saved.name)}
            return
        self.embedding, self.info = self._learn(run)
        if saved is not None:
            tmp = saved.with_name(f".{saved.name}.tmp")
            save_file({"embedding": self.embedding.detach().float().cpu().contiguous()}, str(tmp),
                      metadata={"concept": run.concept, "word": self.word})
            os.replace(tmp, saved)

    def _learn(self, run):
        config, model = self.config, run.model
        prompts = list(config.training_prompts or run.prompts)
        initializer = config.initializer or ("shape" if model.kind == "toy" else "art")
        initial_ids = word_ids(model, initializer)
        if not initial_ids:
            raise ErasekitError(f"initializer {initializer!r} has no tokens; pass a word")
        generator = torch.Generator().manual_seed(sample_seed(run.seed, 0, 30_011))
        # the concept images, from the unerased model
        chosen = [prompts[k % len(prompts)] for k in range(config.images)]
        latents = []
        with run.original():
            for k, prompt in enumerate(tqdm(chosen, desc="concept images", disable=not run.progress, leave=False)):
                latents.append(run.generate(model.encode([prompt]), [sample_seed(run.seed, 9_999, k)], return_latents=True))
        latents = torch.cat(latents)
        templates = [token_template(model, prompt, replace_word=self.word) for prompt in chosen]
        embedding = input_embedding_matrix(model)[initial_ids[0]].detach().float().clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([embedding], lr=config.learning_rate, weight_decay=0.0)
        last = model.scheduler.config.num_train_timesteps
        losses, steps_run = [], 0
        with run.erased():
            for _ in tqdm(range(config.steps), desc="textual inversion", disable=not run.progress, leave=False):
                optimizer.zero_grad()
                total = 0.0
                for _ in range(config.gradient_accumulation):
                    picks = torch.randint(len(latents), (config.batch_size,), generator=generator).tolist()
                    x0 = latents[picks]
                    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
                    t = torch.randint(last, (len(picks),), generator=generator).to(x0.device)
                    cond = Conditioning.cat([encode_slots(model, templates[k], embedding.unsqueeze(0).to(model.dtype)) for k in picks])
                    prediction = model.predict_noise(add_noise(model, x0, noise, t), t, cond)
                    loss = F.mse_loss(prediction.float(), denoising_target(model, x0, noise, t).float()) / config.gradient_accumulation
                    loss.backward()
                    total += loss.item()
                optimizer.step()
                losses.append(total)
                steps_run += 1
                if run.out_of_time():
                    break
        info = {"steps_run": steps_run, "initializer": initializer, "images": len(latents),
                "first_loss": losses[0] if losses else None, "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}
        return embedding.detach(), info

    def attack_prompt(self, run, prompt: str, index: int) -> AdversarialPrompt:
        model = run.model
        template = token_template(model, prompt, replace_word=self.word)
        with torch.no_grad():
            cond = encode_slots(model, template, self.embedding.unsqueeze(0).to(model.dtype))
        pattern_text = prompt.replace(self.word, "<v*>") if self.word in prompt else f"<v*> {prompt}"
        # no text prompt: v* is an embedding, not a word of the vocabulary
        return AdversarialPrompt(cond, text=None, tensors={"embedding": self.embedding.float(), "template_ids": template.input_ids},
                                 info={"word": self.word, "prompt_with_token": pattern_text, **self.info})
