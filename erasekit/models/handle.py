"""One handle over a text-to-image diffusion model.

Every method, attack and metric in erasekit talks to a :class:`ModelHandle`, never
to a pipeline directly. The handle does what the methods need and nothing clever:

* ``encode(prompts)`` gives the exact conditioning the UNet takes (a
  :class:`Conditioning`), and ``token_positions(prompt, word)`` the rows of a word;
* ``cross_attention_layers()`` lists the cross-attention modules by name;
* ``predict_noise(x_t, t, cond)`` is one UNet call;
* ``sample(...)`` runs classifier-free guidance through any diffusers scheduler,
  from given latents and/or for a slice of the steps (ESD and Receler build x_t so);
* ``decode(latents)`` turns latents into images in [0, 1] (identity for the toy
  model, which works in pixel space).

The handle also keeps the bookkeeping that makes erasures stack and come off
exactly: the original values of every weight an applied erasure touched; and
``with model.erasures_off():`` gives the unerased model for a while.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from erasekit.errors import ErasekitError


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for a batch of prompts.

    ``hidden_states`` is (batch, tokens, dim): CLIP's last hidden state for SD 1.x/2.x,
    the concatenated penultimate states of both encoders for SDXL, MiniLM's token
    states for the toy model. ``added`` holds SDXL's pooled text embedding and time ids.
    """

    hidden_states: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def repeat(self, n: int) -> "Conditioning":
        """Each row repeated n times (batch b -> b*n)."""
        added = None if self.added is None else {k: v.repeat_interleave(n, 0) for k, v in self.added.items()}
        return Conditioning(self.hidden_states.repeat_interleave(n, 0), added)

    def __getitem__(self, index) -> "Conditioning":
        if isinstance(index, int):
            index = slice(index, index + 1)
        added = None if self.added is None else {k: v[index] for k, v in self.added.items()}
        return Conditioning(self.hidden_states[index], added)

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        added = None
        if items[0].added is not None:
            added = {k: torch.cat([c.added[k] for c in items]) for k in items[0].added}
        return Conditioning(torch.cat([c.hidden_states for c in items]), added)

    def with_hidden_states(self, hidden_states: torch.Tensor) -> "Conditioning":
        """The same conditioning with other token states (attacks and adversarial training splice here)."""
        return Conditioning(hidden_states, self.added)

    def detach(self) -> "Conditioning":
        added = None if self.added is None else {k: v.detach() for k, v in self.added.items()}
        return Conditioning(self.hidden_states.detach(), added)


# how an erasure names text-encoder parameters: diffusers' component names, encoder by encoder
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.")


@dataclass
class ModelHandle:
    """A loaded text-to-image model. Build it with :func:`erasekit.load_model`."""

    kind: str  # "sd", "sdxl" or "toy"
    name: str  # what the user passed: hub id, folder or "toy"
    unet: torch.nn.Module
    scheduler: object  # the model's own diffusers scheduler (its config is the training noise schedule)
    tokenizers: list
    text_encoders: list
    vae: torch.nn.Module | None = None
    max_length: int = 77
    default_guidance: float = 7.5
    default_steps: int = 50
    force_zeros_for_empty_prompt: bool = False
    pipeline: object | None = None  # the diffusers pipeline, when there is one
    # erasure bookkeeping (see erasekit.erasure)
    applied_erasures: list = field(default_factory=list)
    original_parameters: dict[str, torch.Tensor] = field(default_factory=dict)

    # ----------------------------------------------------------------- basics
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Default image side in pixels."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        side = (resolution or self.resolution) // self.vae_scale_factor
        return (batch, self.latent_channels, side, side)

    def to(self, device=None, dtype=None) -> "ModelHandle":
        for module in [self.unet, self.vae, *self.text_encoders]:
            if module is not None:
                module.to(device=device, dtype=dtype)
        return self

    @contextlib.contextmanager
    def erasures_off(self):
        """Inside, no erasure is applied (weights original, no added modules); on exit, even after an
        exception, every one is applied again in its order and at its scale (bit-identical weights)."""
        applied = list(self.applied_erasures)
        removed = []
        try:
            for erasure, scale in reversed(applied):
                erasure.remove(self)
                removed.append((erasure, scale))
            yield self
        finally:
            for erasure, scale in reversed(removed):
                erasure.apply(self, scale=scale, force=True)  # it fitted when first applied

    # ------------------------------------------------------------- text side
    def tokenize(self, prompts: Sequence[str], tokenizer_index: int = 0) -> dict[str, torch.Tensor]:
        tokenizer = self.tokenizers[tokenizer_index]
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )

    def token_positions(self, prompt: str, word: str) -> list[int]:
        """Rows of ``encode([prompt]).hidden_states`` that hold ``word`` (all its sub-word tokens).

        Raises a clear error if the word does not occur in the prompt, or if the
        prompt is cut off by the tokenizer before the word.
        """
        ids = self.tokenize([prompt])["input_ids"][0].tolist()
        word_ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not word_ids:
            raise ErasekitError(f"the word {word!r} has no tokens; pass a non-empty word")
        for start in range(len(ids) - len(word_ids), -1, -1):  # the last occurrence
            end = start + len(word_ids)
            if ids[start:end] == word_ids and not self._continues_a_word(ids[end] if end < len(ids) else None):
                return list(range(start, end))
        raise ErasekitError(
            f"{word!r} is not within the first {self.max_length} tokens of {prompt!r}; "
            "shorten the prompt or pick a word that appears in it"
        )

    def _continues_a_word(self, token_id: int | None) -> bool:
        """Whether the token glues onto the one before it (WordPiece's "##" pieces: "star ##fish").

        CLIP's BPE marks word ends instead ("star</w>"), so its word tokens never match inside a
        longer word and nothing continues them.
        """
        if token_id is None:
            return False
        return self.tokenizer.convert_ids_to_tokens(token_id).startswith("##")

    def last_word_index(self, prompt: str) -> int:
        """Index of the prompt's last word token (the BOS/CLS index 0 for an empty prompt).

        This is UCE's ``n = attention_mask.sum() - 2``.
        """
        mask = self.tokenize([prompt])["attention_mask"][0]
        return int(mask.sum().item()) - 2 if int(mask.sum().item()) > 2 else 0

    def check_prompt_fits(self, prompt: str) -> None:
        """Fail clearly if the tokenizer would cut the prompt."""
        n_tokens = len(self.tokenizer(prompt)["input_ids"])
        if n_tokens > self.max_length:
            raise ErasekitError(
                f"{prompt!r} is {n_tokens} tokens, more than the text encoder's {self.max_length}; shorten it"
            )

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | str) -> Conditioning:
        """The UNet conditioning for each prompt, on the handle's device and dtype."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if self.kind == "toy":
            tokens = self.tokenize(prompts).to(self.device)
            states = self.text_encoders[0](**tokens).last_hidden_state
            return Conditioning(states.to(self.dtype))
        if self.kind == "sd":
            ids = self.tokenize(prompts)["input_ids"].to(self.device)
            states = self.text_encoders[0](ids)[0]
            return Conditioning(states.to(self.dtype))
        if self.kind == "sdxl":
            return self._encode_sdxl(prompts)
        raise ErasekitError(f"unknown model kind {self.kind!r}")

    def _encode_sdxl(self, prompts: list[str]) -> Conditioning:
        states, pooled = [], None
        for index, encoder in enumerate(self.text_encoders):
            ids = self.tokenize(prompts, index)["input_ids"].to(self.device)
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder (with projection) gives the pooled embedding
        hidden = torch.cat(states, dim=-1)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        side = self.resolution
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], device=self.device).repeat(len(prompts), 1)
        added = {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.to(self.dtype)}
        return Conditioning(hidden.to(self.dtype), added)

    # ------------------------------------------------------------ weights an erasure may change
    def weight_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter a weight-delta erasure may change, by its name in an erasure file.

        The UNet's under their own names (as every erasure has always named them), the text encoders'
        under their diffusers component names: ``text_encoder.<name>`` and, on SDXL, ``text_encoder_2.<name>``.
        """
        parameters = dict(self.unet.named_parameters())
        for index, encoder in enumerate(self.text_encoders):
            prefix = TEXT_ENCODER_PREFIXES[index]
            parameters.update({f"{prefix}{name}": parameter for name, parameter in encoder.named_parameters()})
        return parameters

    # ------------------------------------------------------------ UNet side
    def cross_attention_layers(self) -> dict[str, torch.nn.Module]:
        """Every cross-attention module (diffusers ``Attention`` attending to text), by name."""
        layers = {}
        for name, module in self.unet.named_modules():
            if getattr(module, "is_cross_attention", False) and hasattr(module, "to_k"):
                layers[name] = module
        return layers

    def key_value_projections(self) -> dict[str, torch.nn.Linear]:
        """The ``to_k`` and ``to_v`` Linear of every cross-attention layer, by parameter-path name."""
        projections = {}
        for name, attention in self.cross_attention_layers().items():
            projections[f"{name}.to_k"] = attention.to_k
            projections[f"{name}.to_v"] = attention.to_v
        return projections

    def predict_noise(self, x_t: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """One UNet call: the noise prediction for (x_t, t, conditioning). Gradients flow if enabled."""
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x_t.device)
        t = t.to(x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        kwargs = {}
        if cond.added is not None:
            kwargs["added_cond_kwargs"] = cond.added
        return self.unet(x_t, t, encoder_hidden_states=cond.hidden_states, **kwargs).sample

    def guided_noise(self, x_t, t, cond: Conditioning, uncond: Conditioning, guidance: float) -> torch.Tensor:
        """Classifier-free guidance: e(x, "") + g * (e(x, c) - e(x, ""))."""
        if guidance == 1.0:
            return self.predict_noise(x_t, t, cond)
        both = self.predict_noise(torch.cat([x_t, x_t]), t, Conditioning.cat([uncond, cond]))
        eps_uncond, eps_cond = both.chunk(2)
        return eps_uncond + guidance * (eps_cond - eps_uncond)

    def make_scheduler(self, name_or_scheduler=None):
        """A fresh scheduler: the model's own, a diffusers class name ("DDIMScheduler"), or an instance."""
        if name_or_scheduler is None:
            return copy.deepcopy(self.scheduler)
        if isinstance(name_or_scheduler, str):
            import diffusers

            cls = getattr(diffusers, name_or_scheduler, None)
            if cls is None or not hasattr(cls, "from_config"):
                raise ErasekitError(
                    f"unknown scheduler {name_or_scheduler!r}; use a diffusers scheduler class name such as DDIMScheduler"
                )
            return cls.from_config(self.scheduler.config)
        return copy.deepcopy(name_or_scheduler)

    def initial_latents(self, batch: int, generator=None, resolution=None, scheduler=None) -> torch.Tensor:
        scheduler = scheduler or self.scheduler
        shape = self.latent_shape(batch, resolution)
        latents = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)
        return (latents * getattr(scheduler, "init_noise_sigma", 1.0)).to(self.device, self.dtype)

    def sample(
        self,
        cond: Conditioning,
        *,
        uncond: Conditioning | None = None,
        guidance: float | None = None,
        num_inference_steps: int | None = None,
        scheduler=None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        start_step: int = 0,
        stop_step: int | None = None,
        resolution: int | None = None,
        noise_fn: Callable | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Denoise with classifier-free guidance; returns latents.

        Steps ``start_step .. stop_step-1`` of an ``num_inference_steps`` schedule are run, so
        ``stop_step=k`` returns x after k steps (the latent at ``scheduler.timesteps[k]``) and
        ``start_step=k, latents=x`` continues from there. ``noise_fn(x, t, cond, uncond, g)``
        replaces the guided prediction (used to sample with another model, e.g. the frozen one).
        """
        guidance = self.default_guidance if guidance is None else guidance
        steps = num_inference_steps or self.default_steps
        scheduler = self.make_scheduler(scheduler)
        scheduler.set_timesteps(steps, device=self.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start_step)
        batch = len(cond)
        if uncond is None:
            uncond = self.encode([""] * batch)
        elif len(uncond) == 1 and batch > 1:
            uncond = uncond.repeat(batch)
        if latents is None:
            latents = self.initial_latents(batch, generator, resolution, scheduler)
        timesteps = scheduler.timesteps[start_step:stop_step]
        predict = noise_fn or self.guided_noise
        for t in tqdm(timesteps, desc="sampling", disable=not progress, leave=False):
            model_input = scheduler.scale_model_input(latents, t)
            noise = predict(model_input, t, cond, uncond, guidance)
            latents = scheduler.step(noise, t, latents).prev_sample
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], shape (batch, 3, H, W), float32 on the CPU."""
        if self.vae is None:
            images = latents
        else:
            images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((images.float().clamp(-1, 1) + 1) / 2).cpu()

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        guidance: float | None = None,
        num_inference_steps: int | None = None,
        scheduler=None,
        negative_prompt: str = "",
    ) -> torch.Tensor:
        """Images for prompts, one seed each (the same seed gives the same image on any batch size)."""
        if len(prompts) != len(seeds):
            raise ErasekitError("give one seed per prompt")
        # init_noise_sigma of sigma schedulers (Euler, LMS) depends on the chosen timesteps
        noise_scheduler = self.make_scheduler(scheduler)
        noise_scheduler.set_timesteps(num_inference_steps or self.default_steps, device=self.device)
        latents = torch.cat(
            [self.initial_latents(1, torch.Generator().manual_seed(int(s)), scheduler=noise_scheduler) for s in seeds]
        )
        cond = self.encode(list(prompts))
        uncond = self.encode([negative_prompt] * len(prompts))
        out = self.sample(
            cond, uncond=uncond, guidance=guidance, num_inference_steps=num_inference_steps,
            scheduler=scheduler, latents=latents,
        )
        return self.decode(out)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(batch, 3, H, W) in [0, 1] -> PIL images."""
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]
