"""Concept Inversion, CCE (Pham et al., ICLR 2024): textual inversion on the erased model.

A new token v* is learned so that the **erased** model (frozen) denoises images of the concept
made by the **unerased** model, prompted with the concept's word replaced by v*
(landscape.md, B4)::

    min_{v*}  E_{x, t, ε} || ε - ε_θ*(x_t, "... <v*> ...", t) ||²

v* is an input token embedding (it goes through the text encoder like any word), initialised
from ``initializer``'s embedding. It is learned once per run on ``images`` concept images, kept
in ``OUT/textual_inversion.safetensors`` (a rerun reuses it) and then every attacked prompt is
given with the concept's word replaced by v* (prefixed when the word does not occur). Defaults
are CCE's: 5000 steps, batch 4 x gradient accumulation 4, lr 5e-3, 25 images. Learning
checkpoints into ``OUT/textual_inversion/`` (:mod:`erasekit.training`) every ``checkpoint_every``
steps, and a rerun into the same folder continues from the newest checkpoint.

On SDXL v* is one new token in both text encoders, as SDXL textual inversion does it: two
embeddings, 768 wide for ``text_encoder`` and 1280 for ``text_encoder_2``, both started from the
initializer's token and learned together (the loss reaches the second through the token states
and the pooled ``text_embeds``). The file keeps them as ``clip_l`` and ``clip_g``, the key names of
SDXL embedding files, so diffusers' ``load_textual_inversion`` takes each with its encoder; with
one text encoder the key is ``embedding``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from erasekit.attacks.base import AdversarialPrompt, Attack, AttackConfig, add_noise, denoising_target
from erasekit.models.tokens import check_shared_vocabulary, encode_slots, token_embeddings, token_template, word_ids
from erasekit.errors import ErasekitError
from erasekit.models.handle import Conditioning
from erasekit.training import (
    Checkpoints, comparable, generator_state, load_optimizer_state, optimizer_state, set_generator_state, weights_digest,
)
from erasekit.utils import sample_seed, save_safetensors


@dataclass
class TextualInversionConfig(AttackConfig):
    """CCE's defaults (landscape.md, B4)."""

    steps: int = field(default=5000, metadata={"help": "Optimiser steps learning the new token v*.", "min": 0})
    batch_size: int = field(default=4, metadata={"help": "Concept images per optimiser micro-batch.", "min": 1})
    gradient_accumulation: int = field(default=4, metadata={"help": "Micro-batches accumulated per optimiser step.", "min": 1})
    learning_rate: float = field(default=5e-3, metadata={"help": "Learning rate of the token embedding v*.", "gt": 0})
    images: int = field(default=25, metadata={"help": "Concept images drawn by the unerased model to learn v* on.", "min": 1})
    initializer: str | None = field(default=None, metadata={
        "help": "v* starts at this word's first token (none: 'shape' on the toy model, 'art' elsewhere)."})
    concept_word: str | None = field(default=None, metadata={
        "help": "The word v* replaces in the prompts (none: the concept)."})
    training_prompts: list | None = field(default=None, metadata={
        "help": "Prompts of the concept images v* is learned on (none: the attacked prompts)."})
    checkpoint_every: int = field(default=500, metadata={
        "help": "Steps between checkpoints of v* in the output folder; a rerun continues from the newest.", "min": 1})


def embedding_keys(model) -> list[str]:
    """The names v* is saved under, one per text encoder: ``embedding``; on SDXL ``clip_l`` and ``clip_g``."""
    return ["embedding"] if len(model.text_encoders) == 1 else ["clip_l", "clip_g"]


class TextualInversionAttack(Attack):
    name = "textual-inversion"
    config_class = TextualInversionConfig

    def prepare(self, run) -> None:
        config, model = self.config, run.model
        if config.steps < 0 or config.batch_size < 1 or config.gradient_accumulation < 1 or config.images < 1:
            raise ErasekitError("textual-inversion needs steps >= 0, batch_size >= 1, gradient_accumulation >= 1, images >= 1")
        check_shared_vocabulary(model)
        self.word = config.concept_word or run.concept
        self.keys = embedding_keys(model)
        saved = run.artifact_path("textual_inversion.safetensors")
        if saved is not None and saved.is_file():
            tensors = load_file(str(saved))
            if set(self.keys) - set(tensors):
                raise ErasekitError(f"{saved} holds {sorted(tensors)}, not v* for this model's text encoders ({self.keys}); "
                                    "delete it or use another --out")
            self.embeddings = [tensors[key].to(model.device) for key in self.keys]
            with safe_open(str(saved), framework="pt") as f:  # how it was learned (older files: unknown)
                learned = json.loads((f.metadata() or {}).get("info", "{}"))
            self.info = {"steps_run": None, **learned, "reused": str(saved.name)}
            return
        self.embeddings, self.info = self._learn(run)
        if saved is not None:
            save_safetensors(saved, {key: e.detach().float().cpu().contiguous() for key, e in zip(self.keys, self.embeddings)},
                             metadata={"concept": run.concept, "word": self.word, "info": json.dumps(self.info)})

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
        with model.erasures_off():
            for k, prompt in enumerate(tqdm(chosen, desc="concept images", disable=not run.progress, leave=False)):
                latents.append(run.generate(model.encode([prompt]), [sample_seed(run.seed, 9_999, k)], return_latents=True))
        latents = torch.cat(latents)
        templates = [token_template(model, prompt, replace_word=self.word) for prompt in chosen]
        embeddings = [e.requires_grad_(True) for e in token_embeddings(model, initial_ids[0])]  # one per text encoder
        optimizer = torch.optim.AdamW(embeddings, lr=config.learning_rate, weight_decay=0.0)
        last = model.scheduler.config.num_train_timesteps
        losses, steps_run = [], 0
        checkpoints = None
        folder = run.artifact_path("textual_inversion")
        if folder is not None:
            key = {"attack": self.name, "concept": run.concept, "word": self.word, "initializer": initializer, "seed": run.seed,
                   "prompts": chosen, "config": comparable(dataclasses.asdict(config), ("steps", "checkpoint_every", "time_s")),
                   "model": weights_digest(dict(model.unet.named_parameters())), "erasures": [(e.digest, scale) for e, scale in model.applied_erasures]}
            checkpoints = Checkpoints(folder, "v", key)
            saved = checkpoints.load()  # another run's checkpoint is refused
            if saved is not None:
                step, tensors, state = saved
                with torch.no_grad():
                    for key, embedding in zip(self.keys, embeddings):
                        embedding.copy_(tensors[key])
                load_optimizer_state("adamw", optimizer, tensors, state["adamw"])
                set_generator_state(generator, state["generator"])
                losses, steps_run = list(state["losses"]), step
        for _ in tqdm(range(steps_run, config.steps), desc="textual inversion", disable=not run.progress, leave=False):
            optimizer.zero_grad()
            total = 0.0
            for _ in range(config.gradient_accumulation):
                picks = torch.randint(len(latents), (config.batch_size,), generator=generator).tolist()
                x0 = latents[picks]
                noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
                t = torch.randint(last, (len(picks),), generator=generator).to(x0.device)
                slot = [e.unsqueeze(0).to(model.dtype) for e in embeddings]
                cond = Conditioning.cat([encode_slots(model, templates[k], slot) for k in picks])
                prediction = model.predict_noise(add_noise(model, x0, noise, t), t, cond)
                loss = F.mse_loss(prediction.float(), denoising_target(model, x0, noise, t).float()) / config.gradient_accumulation
                loss.backward()
                total += loss.item()
            optimizer.step()
            losses.append(total)
            steps_run += 1
            if checkpoints is not None and steps_run % config.checkpoint_every == 0:
                tensors, values = optimizer_state("adamw", optimizer)
                checkpoints.save(steps_run, {**dict(zip(self.keys, embeddings)), **tensors},
                                 {"adamw": values, "generator": generator_state(generator), "losses": losses})
            if run.out_of_time():
                break
        info = {"steps_run": steps_run, "initializer": initializer, "images": len(latents),
                "first_loss": losses[0] if losses else None, "last_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}
        return [e.detach() for e in embeddings], info

    def attack_prompt(self, run, prompt: str, index: int) -> AdversarialPrompt:
        model = run.model
        template = token_template(model, prompt, replace_word=self.word)
        with torch.no_grad():
            cond = encode_slots(model, template, [e.unsqueeze(0).to(model.dtype) for e in self.embeddings])
        pattern_text = prompt.replace(self.word, "<v*>") if self.word in prompt else f"<v*> {prompt}"
        # no text prompt: v* is an embedding, not a word of the vocabulary
        tensors = {**{key: e.float() for key, e in zip(self.keys, self.embeddings)}, "template_ids": template.input_ids}
        return AdversarialPrompt(cond, text=None, tensors=tensors,
                                 info={"word": self.word, "prompt_with_token": pattern_text, **self.info})
