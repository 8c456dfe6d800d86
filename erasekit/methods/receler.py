"""Receler: Reliable Concept Erasing via Lightweight Erasers (Huang et al., ECCV 2024; arXiv 2311.17717).

Receler leaves the UNet's weights alone and adds a small **eraser** after every
cross-attention layer (research notes, Part A1). With o = attn2(norm2(x)) the block computes

    x <- x + o + s * E(o),    E(o) = W_up GELU(W_down o + b_down) + b_up

(rank r = ``eraser_rank``, 128; W_up and b_up start at zero, so a fresh eraser changes
nothing; s is the inference-time ``scale`` of ``erasure.apply(model, scale=...)``, 1 by
default). It is installed as an *output hook* of erasekit's cross-attention processor
(:mod:`erasekit.models.attention`), one eraser per cross-attention module keyed by the
module's full path (``down_blocks.1.attentions.0.transformer_blocks.0.attn2``), so SDXL's
deeper transformer stacks get one eraser per block. Several erasers stack on one model,
each under its own hook name; they compose in the order they were applied (the second
sees the first's output). On SD-1.x at r = 128 the erasers hold 3,209,408 values (0.37 %
of the UNet).

**One training iteration** (Part A2; only the erasers train, the UNet is frozen):

1. draw a concept c (uniformly when several are given), a DDIM index t_enc in
   {0 .. N-1} (N = ``ddim_steps``) and fresh noise;
2. x_t: partial N-step DDIM (eta 0) from the noise with classifier-free guidance
   ``start_guidance`` on c, **with the erasers on** (on-policy, as in ESD's paper code),
   without gradients. ``timestep_coupling="official"`` (the default) reproduces the
   released code's coupling of x_t and t: t is drawn from the CompVis interval
   [T t_enc / N, T (t_enc + 1) / N) and the sampler runs min(N, N + 1 - t_enc) steps, so
   x_t sits two DDIM steps *less* noisy than t (t_enc in {0, 1} give a fully denoised
   sample). ``"aligned"`` instead runs k = t_enc steps and draws t from the interval
   holding ``scheduler.timesteps[k]`` (erasekit's ESD convention);
3. the frozen teacher, erasers off: ε0 = ε(x_t, t, "") and εc = ε(x_t, t, c). During
   the εc pass the cross-attention probabilities are captured for the concept mask;
4. **adversarial prompt learning** (paper intent, see below): K = ``adversarial_tokens``
   learnable vectors P (one set per concept, initialised U[0, 1), persisting across
   iterations, each set with its own Adam at lr 0.1, weight decay 0.1) are spliced into
   the conditioning right after the concept's tokens, [c; P]. ``adversarial_steps``
   attack steps each take one Adam step on P only, minimising
   || ε_{θ+E}(x_t, t, [c; P]) - εc ||²: the attacker looks for a prompt that makes the
   *erased* model draw the concept again;
5. **one eraser step** on

       L = || ε_{θ+E}(x_t, t, [c; P]) - (ε0 - η (εc - ε0)) ||²  +  λ L_reg

   (the ESD negative-guidance target, η = ``negative_guidance``; λ = ``regularization_weight``),
   with Adam at ``learning_rate`` on the erasers. With ``adversarial_steps=0`` the eraser
   trains on the clean c (the no-adversarial ablation).

**Concept-localised regularisation** (Part A2, step 4). From the captured probabilities
(batch, heads, queries, tokens) the maps of the concept's tokens (the word's own
positions, never BOS) are averaged over those tokens and the heads, and over the
cross-attention layers whose maps are ``mask_downsample`` times smaller than the latent
(the paper's 16x16 maps of SD-1.x's 64x64 latent: ``down_blocks.2`` and ``up_blocks.1``;
for SDXL at 1024 px the 32x32 layers ``down_blocks.2``, ``mid_block`` and ``up_blocks.0``;
for the 24x24 toy model the 6x6 layers ``down_blocks.2``, ``mid_block`` and ``up_blocks.0``;
when no layer has exactly that size the nearest size is used). The map is min-max
normalised per sample, thresholded at τ = ``mask_threshold`` (>= τ -> 1) and resized with
nearest-neighbour interpolation to every eraser's resolution. Then

    L_reg = mean over erasers l of  (1 / |Ω̄_l|) Σ_{p ∈ Ω̄_l} mean_channels(E_l(o)(p)²)

where Ω̄_l are the positions outside the mask: any eraser activity outside the concept
region is penalised.

**Where we differ from the official code** (``jasper0314-huang/Receler`` at 3ccedc9; notes
pitfalls R1-R5), on purpose:

* R1: the released code writes P into an advanced-indexing *copy* of the embedding, so
  the UNet never sees P and its 50 attack steps per iteration change nothing. Here P is
  spliced with a real concatenation of the hidden states (differentiable), as the paper
  describes; the vectors replace the token slots right after the concept (the first
  end-of-text/padding slots, where the released code meant to write them). The released
  behaviour, in effect, is ``adversarial_steps=0`` (ESD target + localisation).
* R2: with 0 attack steps the released code never updates the eraser; here it does.
* The eraser step runs its own forward pass after the attack steps (the released code
  reuses the last attack step's forward, i.e. P one Adam step older).
* R5: training and inference share one code path (diffusers + these hooks); the erasers
  are keyed by full module path, not ``attentions.j``.
* The eraser computes in float32 whatever the model's dtype.

The eraser is an add-on: whoever holds the model file and the eraser file can simply not
apply it (an open-weights caveat the CPE reviewers raised for Receler too).

**Checkpoints** (``checkpoint_dir`` / ``checkpoint_every`` / ``resume``) go through :mod:`erasekit.training`;
a resumed run ends with the uninterrupted run's erasers, bit for bit on the CPU.

**Precision and memory.** ``mixed_precision="bf16"`` or ``"fp16"`` runs the UNet passes under CUDA
autocast (the erasers and the adversarial vectors stay float32, the erasers compute in float32;
fp16 adds a gradient scaler); on a CPU it is ignored with a warning. ``gradient_checkpointing=True``
recomputes the UNet's block activations in the backward passes (the attack steps and the eraser step
both backpropagate through the whole UNet).

**Several processes** (``accelerate launch`` / ``torchrun``): data parallel through
:class:`erasekit.training.DataParallel`, as ESD: ``batch_size`` is the global batch, every process
draws the same choices for all of it and computes its own rows, and the gradients of the erasers
and of the adversarial vectors are averaged before every Adam step, so every process holds the same
erasers and vectors, those of one process with the same batch (up to float rounding).

Presets (``PRESETS``):

``paper``
    the released code's defaults (the dataclass defaults): 500 iterations, Adam at 3e-4,
    batch 1, rank 128, η = 1, start guidance 3, 50-step DDIM, λ = 0.1, τ = 0.1, 16x16 maps,
    50 attack steps of 16 vectors (Adam 0.1, weight decay 0.1) per eraser step.
``toy``
    for the bundled toy model: 200 iterations at batch 2, Adam at 1e-3, rank 32, 10-step DDIM with
    ``timestep_coupling="aligned"``, 5 attack steps of 4 vectors (why each value and what it
    reaches: ``docs/toy-presets.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from erasekit import training
from erasekit.erasure import Erasure, model_signature
from erasekit.errors import ErasekitError
from erasekit.models.attention import hooked_processor, remove_hooks
from erasekit.models.handle import Conditioning
from erasekit.modules.receler import Eraser, eraser_state
from erasekit.targets import EraseTarget
from erasekit.training import (
    MIXED_PRECISION, CheckpointConfig, Precision, comparable, generator_state, load_optimizer_state, optimizer_state,
    set_generator_state, weights_digest,
)

TIMESTEP_COUPLINGS = ("official", "aligned")


@dataclass
class RecelerConfig(CheckpointConfig):
    """Receler settings; the defaults are the released code's (research notes, Part A3)."""

    iterations: int = field(default=500, metadata={"help": "Eraser updates (optimiser steps).", "min": 1})
    learning_rate: float = field(default=3e-4, metadata={"help": "Adam learning rate of the erasers.", "gt": 0})
    eraser_rank: int = field(default=128, metadata={"help": "r: the bottleneck width of each eraser.", "min": 1})
    negative_guidance: float = field(default=1.0, metadata={"help": "η of the ESD target: how far it is pushed from the concept."})
    batch_size: int = field(default=1, metadata={"help": "Latents per eraser update.", "min": 1})
    start_guidance: float = field(default=3.0, metadata={"help": "Classifier-free guidance while sampling x_t."})
    ddim_steps: int = field(default=50, metadata={"help": "N: steps of the DDIM schedule (eta 0) x_t is sampled on.", "min": 1})
    timestep_coupling: str = field(default="official", metadata={
        "help": "How the training timestep follows the DDIM step: official (the released code) or aligned.",
        "choices": TIMESTEP_COUPLINGS})
    resolution: int | None = field(default=None, metadata={"help": "Image side in pixels (none: the model's default).", "min": 1})
    regularization_weight: float = field(default=0.1, metadata={
        "help": "λ of the concept-localised regularisation that keeps the erasers off non-concept regions.", "min": 0})
    mask_threshold: float = field(default=0.1, metadata={
        "help": "τ: attention above it marks the concept's region in the mask.", "min": 0, "max": 1})
    mask_downsample: int = field(default=4, metadata={
        "help": "Use the attention maps at the latent side divided by this.", "min": 1})
    adversarial_steps: int = field(default=50, metadata={
        "help": "Adversarial prompt steps per eraser update (0: no adversarial prompts).", "min": 0})
    adversarial_tokens: int = field(default=16, metadata={
        "help": "K: learnable vectors spliced after the concept's tokens.", "min": 1})
    adversarial_learning_rate: float = field(default=0.1, metadata={"help": "Adam learning rate of the adversarial vectors.", "gt": 0})
    adversarial_weight_decay: float = field(default=0.1, metadata={"help": "Adam weight decay of the adversarial vectors.", "min": 0})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute UNet activations in the backward passes to save memory."})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "CUDA autocast precision of the UNet passes: bf16 or fp16 (none: float32; ignored on a CPU).",
        "choices": ("bf16", "fp16")})
    seed: int = field(default=0, metadata={"help": "Seed of the eraser initialisation and the training draws."})


CONFIG = RecelerConfig
DATA_PARALLEL = True  # several processes split each batch (erasekit.training.DataParallel)

PRESETS = {
    "paper": {},
    # why each toy value differs from the paper, and what it reaches: docs/toy-presets.md
    "toy": {
        "iterations": 200, "learning_rate": 1e-3, "batch_size": 2, "eraser_rank": 32, "ddim_steps": 10,
        "timestep_coupling": "aligned", "adversarial_steps": 5, "adversarial_tokens": 4,
    },
}


# ------------------------------------------------------------------------------- the eraser
def eraser_parameter_count(dims: list[int], rank: int) -> int:
    """Values in the erasers of layers with these widths: 2 r d + r + d each (257 d + 128 at r = 128)."""
    return sum(2 * rank * d + rank + d for d in dims)


# ------------------------------------------------------------------- where each layer sits
def cross_attention_resolutions(model, resolution: int | None = None) -> dict[str, tuple[int, int]]:
    """(height, width) of the feature map each cross-attention layer sees, for latents of ``resolution`` px.

    Read off the UNet's structure: a down block's layers sit after the downsamplers of the
    blocks before it, the middle block after all of them, an up block's at the size of
    the skip connections it consumes.
    """
    _, _, height, width = model.latent_shape(1, resolution)
    unet = model.unet
    sizes = [(height, width)]
    for block in unet.down_blocks:
        if getattr(block, "downsamplers", None) is not None:
            h, w = sizes[-1]
            sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    deepest = len(sizes) - 1
    resolutions = {}
    for path in model.cross_attention_layers():
        parts = path.split(".")
        if parts[0] == "down_blocks":
            index = int(parts[1])
            level = sum(getattr(b, "downsamplers", None) is not None for b in unet.down_blocks[:index])
        elif parts[0] == "mid_block":
            level = deepest
        elif parts[0] == "up_blocks":
            index = int(parts[1])
            level = deepest - sum(getattr(b, "upsamplers", None) is not None for b in unet.up_blocks[:index])
        else:
            raise ErasekitError(f"cannot tell the resolution of cross-attention layer {path!r}; Receler supports UNet2DConditionModel")
        resolutions[path] = sizes[max(0, min(level, deepest))]
    return resolutions


def choose_mask_layers(resolutions: dict[str, tuple[int, int]], latent_height: int, downsample: int) -> list[str]:
    """The layers whose maps are ``downsample`` times smaller than the latent (the nearest size if none is)."""
    if not resolutions:
        raise ErasekitError("the model has no cross-attention layer; Receler needs one")
    target = latent_height / downsample
    best = min({h for h, _ in resolutions.values()}, key=lambda h: (abs(math.log(h / target)), -h))
    return [path for path, (h, _) in resolutions.items() if h == best]


# ----------------------------------------------------------------------- concept mask
def concept_attention_maps(probs: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """(batch, heads, queries, tokens) attention probabilities -> (batch, queries): mean over the concept's tokens, then heads."""
    return probs[..., positions].float().mean(-1).mean(1)


def concept_mask(maps: torch.Tensor, threshold: float) -> torch.Tensor:
    """(batch, h, w) attention maps -> binary masks: min-max normalised per sample, then >= threshold."""
    flat = maps.flatten(1).float()
    low = flat.min(1, keepdim=True).values
    high = flat.max(1, keepdim=True).values
    normalised = (flat - low) / (high - low).clamp_min(1e-12)
    return (normalised >= threshold).float().view_as(maps)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(batch, h, w) binary mask -> (batch, size[0] * size[1]), nearest-neighbour."""
    return F.interpolate(mask[:, None], size=size, mode="nearest").flatten(1)


def localization_loss(outputs: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over erasers of the mean (over positions outside the mask) of mean_channels(E(o)²).

    ``outputs[path]`` is the eraser output (batch, queries, dim); ``masks[path]`` (batch, queries).
    """
    terms = []
    for path, output in outputs.items():
        outside = 1 - masks[path].to(output.device)
        energy = output.float().pow(2).mean(-1)
        terms.append(((energy * outside).sum(-1) / outside.sum(-1).clamp_min(1)).mean())
    return torch.stack(terms).mean()


# ------------------------------------------------------------------ adversarial prompt
def splice_adversarial(cond: Conditioning, embeddings: torch.Tensor, start: int) -> Conditioning:
    """``cond`` with token rows ``start .. start+K-1`` replaced by the K ``embeddings`` (a differentiable concat)."""
    hidden = cond.hidden_states
    count = embeddings.shape[0]
    if start + count > hidden.shape[1]:
        raise ErasekitError(
            f"{count} adversarial tokens after token {start} need {start + count} token slots, but the text encoder "
            f"gives {hidden.shape[1]}; lower adversarial_tokens"
        )
    inserted = embeddings.to(hidden.dtype)[None].expand(hidden.shape[0], -1, -1)
    return cond.with_hidden_states(torch.cat([hidden[:, :start], inserted, hidden[:, start + count:]], dim=1))


# -------------------------------------------------------------------------- timesteps
def coupled_timesteps(t_enc: int, ddim_steps: int, num_train_timesteps: int, coupling: str) -> tuple[int, int, int]:
    """(DDIM steps to run, low, high): x_t is the latent after that many steps; t is drawn from [low, high)."""
    n, total = ddim_steps, num_train_timesteps
    if not 0 <= t_enc < n:
        raise ErasekitError(f"DDIM index {t_enc} is outside 0..{n - 1}")
    if coupling == "official":  # CompVis interval; the patched sampler stops after index t_enc - 1
        low, high = total * t_enc // n, total * (t_enc + 1) // n
        return min(n, n + 1 - t_enc), low, max(high, low + 1)
    if coupling == "aligned":  # the interval holding diffusers' timesteps[t_enc] (counted from the top)
        low, high = total * (n - 1 - t_enc) // n, total * (n - t_enc) // n
        return t_enc, low, max(high, low + 1)
    raise ErasekitError(f"timestep_coupling must be one of {TIMESTEP_COUPLINGS}, not {coupling!r}")


# ---------------------------------------------------------------------------- training
def _check_config(config: RecelerConfig) -> None:
    if config.iterations < 1 or config.batch_size < 1 or config.ddim_steps < 1 or config.eraser_rank < 1:
        raise ErasekitError("Receler needs iterations, batch_size, ddim_steps and eraser_rank of at least 1")
    if config.adversarial_steps < 0 or config.adversarial_tokens < 1:
        raise ErasekitError("adversarial_steps must be >= 0 and adversarial_tokens >= 1")
    if config.learning_rate <= 0 or config.adversarial_learning_rate <= 0:
        raise ErasekitError("learning rates must be positive")
    if config.timestep_coupling not in TIMESTEP_COUPLINGS:
        raise ErasekitError(f"timestep_coupling must be one of {TIMESTEP_COUPLINGS}, not {config.timestep_coupling!r}")
    if not 0 <= config.mask_threshold <= 1:
        raise ErasekitError(f"mask_threshold must be in [0, 1], not {config.mask_threshold}")
    if config.mask_downsample < 1:
        raise ErasekitError("mask_downsample must be at least 1")
    if config.checkpoint_dir is not None and config.checkpoint_every < 1:
        raise ErasekitError("checkpoint_every must be at least 1")
    if config.mixed_precision not in MIXED_PRECISION:
        raise ErasekitError(f"mixed_precision must be None, 'bf16' or 'fp16', not {config.mixed_precision!r}")


class RecelerTrainer:
    """One Receler run on a model handle: ``train()``, then ``state()``, then always ``close()``.

    Between construction and ``close()`` the erasers are on the model (output hooks under
    this trainer's name); :func:`erase` drives it; tests can call ``step`` and friends.
    """

    def __init__(self, model, concepts: list[str], config: RecelerConfig):
        _check_config(config)
        if not concepts:
            raise ErasekitError("no concept to erase; pass at least one concept")
        self.model, self.concepts, self.config = model, concepts, config
        self.device = model.device
        self.parallel = training.DataParallel(config.batch_size, self.device)  # this process's rows of each batch
        self.precision = Precision(config.mixed_precision, self.device, model.dtype)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.name = f"receler-train-{id(self)}"
        self._closed = False
        self._restore_checkpointing = lambda: None

        # the erasers, one per cross-attention layer, trained in float32
        self.layers = model.cross_attention_layers()
        if not self.layers:
            raise ErasekitError("the model has no cross-attention layer; Receler needs one")
        self.erasers = {
            path: Eraser(attn.to_out[0].out_features, config.eraser_rank, self.generator).to(self.device)
            for path, attn in self.layers.items()
        }
        self.parameters = [p for eraser in self.erasers.values() for p in eraser.parameters()]
        self.optimizer = torch.optim.Adam(self.parameters, lr=config.learning_rate)
        self.eraser_on = True
        self.eraser_outputs: dict[str, torch.Tensor] | None = None  # filled while recording

        # where the mask comes from
        self.latent_shape = model.latent_shape(config.batch_size, config.resolution)
        self.resolutions = cross_attention_resolutions(model, config.resolution)
        self.mask_layers = choose_mask_layers(self.resolutions, self.latent_shape[2], config.mask_downsample)
        self.mask_size = self.resolutions[self.mask_layers[0]]
        self._maps: dict[str, torch.Tensor] = {}

        # conditioning and concept token positions, once
        self.cond = [model.encode([c]) for c in self.concepts]
        self.uncond = model.encode([""])
        self.positions = [model.token_positions(c, c) for c in self.concepts]
        tokens, width = self.cond[0].hidden_states.shape[1:]
        self.adversarial = []
        self.adversarial_optimizers = []
        for concept, positions in zip(self.concepts, self.positions):
            if positions[-1] + 1 + config.adversarial_tokens > tokens:
                raise ErasekitError(
                    f"{config.adversarial_tokens} adversarial tokens after the {len(positions)} tokens of {concept!r} need "
                    f"{positions[-1] + 1 + config.adversarial_tokens} token slots, but the text encoder gives {tokens}; "
                    "lower adversarial_tokens or shorten the concept"
                )
            vectors = torch.rand(config.adversarial_tokens, width, generator=self.generator).to(self.device).requires_grad_(True)
            self.adversarial.append(vectors)
            self.adversarial_optimizers.append(torch.optim.Adam(
                [vectors], lr=config.adversarial_learning_rate, weight_decay=config.adversarial_weight_decay
            ))

        self.scheduler = model.make_scheduler("DDIMScheduler")
        self.num_train_timesteps = int(model.scheduler.config.num_train_timesteps)
        self.iteration = 0
        self.history: dict[str, list[float]] = {"loss": [], "erase": [], "regularization": [], "attack": []}
        self.concept_counts = [0] * len(self.concepts)

        # last, once nothing can fail: the erasers go on the model, the UNet is frozen
        self._requires_grad = {name: p.requires_grad for name, p in model.unet.named_parameters()}
        model.unet.requires_grad_(False)
        for path, eraser in self.erasers.items():
            hooked_processor(self.layers[path]).output_hooks[self.name] = self._training_hook(path, eraser)
        self._restore_checkpointing = training.enable_gradient_checkpointing(model.unet, config.gradient_checkpointing)

    # ------------------------------------------------------------------------ hooks
    def _training_hook(self, path: str, eraser: Eraser):
        def hook(attn, out):
            if not self.eraser_on:
                return out
            with torch.autocast(out.device.type, enabled=False):  # the eraser computes in float32, under autocast too
                erased = eraser(out.float())
            if self.eraser_outputs is not None:
                self.eraser_outputs[path] = erased
            return out + erased.to(out.dtype)

        return hook

    @contextlib.contextmanager
    def eraser_off(self):
        """Inside, this trainer's erasers do nothing: the UNet (with any erasure applied before) is the frozen teacher."""
        self.eraser_on = False
        try:
            yield
        finally:
            self.eraser_on = True

    @contextlib.contextmanager
    def capture_maps(self, positions: list[int], batch: int):
        """Inside, the mask layers record the concept's attention maps of the first ``batch`` rows."""
        self._maps = {}
        name = f"{self.name}-mask"

        def make(path):
            h, w = self.resolutions[path]

            def hook(attn, probs):
                if probs.shape[2] != h * w:
                    raise ErasekitError(f"{path} attends over {probs.shape[2]} positions, expected {h}x{w}")
                self._maps[path] = concept_attention_maps(probs[:batch], positions)

            return hook

        for path in self.mask_layers:
            hooked_processor(self.layers[path]).probs_hooks[name] = make(path)
        try:
            yield
        finally:
            remove_hooks({p: self.layers[p] for p in self.mask_layers}, name)

    # --------------------------------------------------------------------- one iteration
    def draw(self) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """This iteration's random choices: concept index, DDIM steps to run, timesteps t and starting noise."""
        config, generator = self.config, self.generator
        concept_index = int(torch.randint(len(self.concepts), (1,), generator=generator))
        t_enc = int(torch.randint(config.ddim_steps, (1,), generator=generator))
        steps, low, high = coupled_timesteps(t_enc, config.ddim_steps, self.num_train_timesteps, config.timestep_coupling)
        t = torch.randint(low, high, (config.batch_size,), generator=generator)
        noise = torch.randn(self.latent_shape, generator=generator) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        return concept_index, steps, t, noise.to(self.device, self.model.dtype)

    @torch.no_grad()
    def sample_x_t(self, concept_index: int, steps: int, noise: torch.Tensor) -> torch.Tensor:
        """``steps`` DDIM steps from ``noise`` with CFG on the concept, erasers on (on-policy)."""
        batch = noise.shape[0]
        with self.precision.autocast():
            return self.model.sample(
                self.cond[concept_index].repeat(batch), uncond=self.uncond.repeat(batch), guidance=self.config.start_guidance,
                num_inference_steps=self.config.ddim_steps, scheduler=self.scheduler, latents=noise, stop_step=steps,
            )

    @torch.no_grad()
    def teacher(self, x_t: torch.Tensor, t: torch.Tensor, concept_index: int):
        """ε(x_t, c), ε(x_t, "") of the frozen model, and the concept's binary mask per eraser layer."""
        batch = x_t.shape[0]
        cond = Conditioning.cat([self.cond[concept_index].repeat(batch), self.uncond.repeat(batch)])
        with self.eraser_off(), self.capture_maps(self.positions[concept_index], batch), self.precision.autocast():
            eps = self.model.predict_noise(torch.cat([x_t, x_t]), t.repeat(2), cond).float()
        eps_concept, eps_empty = eps.chunk(2)
        h, w = self.mask_size
        maps = torch.stack([self._maps[path].view(batch, h, w) for path in self.mask_layers]).mean(0)
        mask = concept_mask(maps, self.config.mask_threshold)
        masks = {path: resize_mask(mask, size) for path, size in self.resolutions.items()}
        return eps_concept, eps_empty, masks

    def adversarial_condition(self, concept_index: int, detach: bool = False) -> Conditioning:
        """[c; P]: the concept's conditioning with its adversarial vectors after its tokens."""
        vectors = self.adversarial[concept_index]
        return splice_adversarial(self.cond[concept_index], vectors.detach() if detach else vectors,
                                  self.positions[concept_index][-1] + 1)

    def attack_step(self, x_t: torch.Tensor, t: torch.Tensor, concept_index: int, eps_concept: torch.Tensor) -> float:
        """One Adam step on P minimising || ε_{θ+E}(x_t, [c; P]) - ε*(x_t, c) ||² (erasers fixed); returns the loss."""
        vectors = self.adversarial[concept_index]
        cond = self.adversarial_condition(concept_index).repeat(x_t.shape[0])
        with self.precision.autocast():
            prediction = self.model.predict_noise(x_t, t, cond)
        loss = F.mse_loss(prediction.float(), eps_concept)
        optimizer = self.adversarial_optimizers[concept_index]
        self.precision.step(loss, optimizer, sync=lambda: self.parallel.average_gradients([vectors]), inputs=[vectors])
        vectors.grad = None
        return float(loss.detach())

    def eraser_step(self, x_t, t, concept_index: int, eps_concept, eps_empty, masks) -> tuple[float, float]:
        """One Adam step on the erasers: L_erase + λ L_reg; returns (L_erase, L_reg)."""
        config = self.config
        if config.adversarial_steps > 0:
            cond = self.adversarial_condition(concept_index, detach=True)
        else:
            cond = self.cond[concept_index]
        target = eps_empty - config.negative_guidance * (eps_concept - eps_empty)
        self.eraser_outputs = {}
        try:
            with self.precision.autocast():
                prediction = self.model.predict_noise(x_t, t, cond.repeat(x_t.shape[0]))
            outputs = self.eraser_outputs
        finally:
            self.eraser_outputs = None
        erase_loss = F.mse_loss(prediction.float(), target)
        regularization = localization_loss(outputs, {path: masks[path] for path in outputs})
        loss = erase_loss + config.regularization_weight * regularization
        self.precision.step(loss, self.optimizer, sync=lambda: self.parallel.average_gradients(self.parameters))
        return float(erase_loss.detach()), float(regularization.detach())

    def step(self) -> dict[str, float]:
        """One Receler iteration: draw, sample x_t, teacher, attack steps, one eraser step (on this process's rows)."""
        config = self.config
        concept_index, steps, t, noise = self.draw()
        rows = self.parallel.rows
        t, noise = t[rows].to(self.device), noise[rows]
        x_t = self.sample_x_t(concept_index, steps, noise).to(self.model.dtype)
        eps_concept, eps_empty, masks = self.teacher(x_t, t, concept_index)
        attack = float("nan")
        for _ in range(config.adversarial_steps):
            attack = self.attack_step(x_t, t, concept_index, eps_concept)
        erase_loss, regularization = self.eraser_step(x_t, t, concept_index, eps_concept, eps_empty, masks)
        self.iteration += 1
        self.concept_counts[concept_index] += 1
        erase_loss, regularization, attack = self.parallel.mean([erase_loss, regularization, attack])  # of the global batch
        losses = {"loss": erase_loss + config.regularization_weight * regularization, "erase": erase_loss,
                  "regularization": regularization, "attack": attack}
        for key, value in losses.items():
            self.history[key].append(value)
        return losses

    def train(self, progress: bool = True) -> None:
        """Run (or continue) to ``config.iterations``, checkpointing on the way if asked (:func:`erasekit.training.run`)."""
        def postfix(losses):
            figures = {"loss": f"{losses['loss']:.4f}", "reg": f"{losses['regularization']:.2e}"}
            if self.config.adversarial_steps:
                figures["attack"] = f"{losses['attack']:.4f}"
            return figures

        training.run(self, "receler", f"Receler {', '.join(self.concepts)}", progress, postfix)

    # ------------------------------------------------------------------------ the result
    def state(self) -> dict[str, torch.Tensor]:
        return eraser_state(self.erasers)

    def close(self) -> None:
        """Take the training erasers off and restore the UNet's requires_grad flags."""
        if self._closed:
            return
        self._closed = True
        remove_hooks(self.layers, self.name)
        remove_hooks(self.layers, f"{self.name}-mask")
        self._restore_checkpointing()
        for name, parameter in self.model.unet.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, False))
        self.optimizer.state.clear()

    def summary(self) -> dict:
        """What goes into the erasure's ``info``."""
        def curve(values):
            values = [v for v in values if v == v]  # drop NaN (no attack)
            if not values:
                return []
            window = max(1, len(values) // 50)
            return [round(sum(values[i:i + window]) / len(values[i:i + window]), 6) for i in range(0, len(values), window)]

        return {
            "iterations": self.iteration,
            "eraser_parameters": sum(p.numel() for p in self.parameters),
            "erasers": len(self.erasers),
            "mask_layers": self.mask_layers,
            "mask_size": list(self.mask_size),
            "loss_curve": curve(self.history["loss"]),
            "erase_curve": curve(self.history["erase"]),
            "regularization_curve": curve(self.history["regularization"]),
            "attack_curve": curve(self.history["attack"]),
            "concept_counts": dict(zip(self.concepts, self.concept_counts)),
            "precision": self.precision.name,
            "device": self.device.type,
            "processes": self.parallel.world_size,
            "on_top_of": [e.fingerprint for e, _ in self.model.applied_erasures],
        }

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_key(self) -> dict:
        """Everything that determines the run: concepts, settings (less iterations), the frozen teacher.

        The teacher is the cross-attention layers' base weights (the ones the erasers sit on) and
        the erasures already applied to the model.
        """
        original = self.model.original_parameters
        base = {name: original.get(name, value) for path, attn in self.layers.items()
                for name, value in attn.named_parameters(prefix=path)}
        return {"method": "receler", "concepts": self.concepts, "config": comparable(dataclasses.asdict(self.config)),
                "base": weights_digest(base), "on_top_of": [(e.digest, scale) for e, scale in self.model.applied_erasures]}

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON) that let a run continue bit for bit: erasers, adversarial vectors, every Adam, RNG, history."""
        tensors = {f"eraser.{path}.{name}": parameter
                   for path, eraser in self.erasers.items() for name, parameter in eraser.named_parameters()}
        adam, adam_values = optimizer_state("adam", self.optimizer)
        tensors.update(adam)
        adversarial_values = []
        for index, (vectors, optimizer) in enumerate(zip(self.adversarial, self.adversarial_optimizers)):
            tensors[f"adversarial.{index}"] = vectors
            adversarial_adam, values = optimizer_state(f"adversarial_adam.{index}", optimizer)
            tensors.update(adversarial_adam)
            adversarial_values.append(values)
        history = {key: [None if v != v else v for v in values] for key, values in self.history.items()}  # NaN -> null
        state = {"iteration": self.iteration, "generator": generator_state(self.generator), "history": history,
                 "concept_counts": self.concept_counts, "adam": adam_values, "adversarial_adam": adversarial_values,
                 "grad_scaler": self.precision.state()}
        return tensors, state

    def load_state(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Restore :meth:`training_state` in place (the optimizers keep pointing at the same tensors)."""
        try:
            with torch.no_grad():
                for path, eraser in self.erasers.items():
                    for name, parameter in eraser.named_parameters():
                        parameter.copy_(tensors[f"eraser.{path}.{name}"].to(parameter.device))
                for index, vectors in enumerate(self.adversarial):
                    vectors.copy_(tensors[f"adversarial.{index}"].to(vectors.device))
            load_optimizer_state("adam", self.optimizer, tensors, state["adam"])
            for index, optimizer in enumerate(self.adversarial_optimizers):
                load_optimizer_state(f"adversarial_adam.{index}", optimizer, tensors, state["adversarial_adam"][index])
            set_generator_state(self.generator, state["generator"])
            self.iteration = int(state["iteration"])
            self.history = {key: [float("nan") if v is None else float(v) for v in state["history"][key]]
                            for key in self.history}
            self.concept_counts = [int(c) for c in state["concept_counts"]]
            self.precision.load_state(state.get("grad_scaler"))
        except (KeyError, IndexError, RuntimeError) as error:
            raise ErasekitError(
                f"the Receler checkpoint at step {step} does not fit this run ({type(error).__name__}: {error}); "
                "use another checkpoint_dir"
            ) from None


def erase(model, targets: list[EraseTarget], config: RecelerConfig | None = None, progress: bool = True) -> Erasure:
    """Erase the targets' concepts by Receler training (each concept's own prompt, ``target.prompts[0]``).

    Several concepts share one set of erasers, one concept drawn per iteration (each has its
    own adversarial vectors). Receler has no preserve prompts (locality comes from the
    concept mask), so a target's ``preserve`` must be empty. The model is returned unchanged.
    """
    config = config or RecelerConfig()
    concepts = [t.concept for t in targets]
    if any(t.preserve for t in targets):
        raise ErasekitError(
            "Receler has no preserve prompts (its concept-localised regularisation keeps other content); "
            "drop the preserve prompts, or use a method that preserves (uce, rece)"
        )
    started = time.time()
    trainer = RecelerTrainer(model, concepts, config)
    try:
        trainer.train(progress=progress)
        modules = trainer.state()
        info = trainer.summary()
    finally:
        trainer.close()
    info["seconds"] = round(time.time() - started, 2)
    signature_names = [f"{path}.to_out.0.weight" for path in trainer.layers]
    return Erasure(
        method="receler", concepts=concepts, base_model=model.name, config=dataclasses.asdict(config),
        modules=modules, module_type="receler", base_signature=model_signature(model, signature_names), info=info,
    )
