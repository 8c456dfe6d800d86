"""ESD: Erasing Concepts from Diffusion Models (Gandikota, Materzyńska, Fiotto-Kaufman, Bau; ICCV 2023).

ESD fine-tunes part of the UNet so that its prediction for the concept c follows *negative*
guidance away from c, as computed by the frozen original model θ* (paper Eq. 6; research
notes, section 1.1)::

    L = || ε_θ(x_t, c, t) - [ ε_θ*(x_t, "", t) - η (ε_θ*(x_t, c, t) - ε_θ*(x_t, "", t)) ] ||²

η is ``negative_guidance``. The target is computed without gradients; only ε_θ(x_t, c, t)
carries them. With ``erase_from = c_f`` (the diffusers rewrite's variant, e.g. "hat" from
"cowboy") the target is ε_θ*(x_t, c_f) - η (ε_θ*(x_t, c) - ε_θ*(x_t, "")), the trained
prediction is ε_θ(x_t, c_f), and x_t is sampled from c_f.

**Target base** (``target_base``; research notes, 1.4 "Correction"). Without ``erase_from``
the official diffusers rewrite (HEAD ``esd_sd.py`` / ``esd_sdxl.py``) bases the target on
the concept's own frozen prediction, ε_θ*(x_t, c) - η (ε_θ*(x_t, c) - ε_θ*(x_t, "")): the
paper's form with η - 1, so the rewrite's η = 2 is the paper's η = 1. ``"unconditional"``
(the default) is the paper's base ε_θ*(x_t, ""), ``"concept"`` the rewrite's. With
``erase_from`` the base is ε_θ*(x_t, c_f) whatever ``target_base`` says.

**Where x_t comes from** (no images are used; research notes, section 1.2). Each iteration
draws one concept (uniformly, when several are given), a DDIM index k uniformly from
{0 .. ddim_steps-1} and fresh noise; x_t is the latent after k steps of ``ddim_steps``-step
DDIM (eta 0) from that noise, with classifier-free guidance ``start_guidance`` on the concept,
run without gradients by the model being trained (``sample_with="trained"``, the paper) or by
the frozen original (``"frozen"``, the diffusers rewrite). Then the DDPM training timestep t
is drawn for each batch element uniformly from the interval of step k:

    t ∈ [ T (N-k-1)/N ,  T (N-k)/N )          (T = num_train_timesteps, N = ddim_steps)

diffusers' DDIM timesteps run **downwards** (timesteps[0] ≈ 980 for N=50), and after k
steps the latent sits at ``scheduler.timesteps[k]`` (k=0: pure noise). The interval above
is the k-th of N equal slices of [0, T) counted from the top, so it holds timesteps[k]
("leading" spacing with steps_offset 0 or 1, and "trailing" spacing alike): k=0 gives
t ∈ [980, 1000), k=49 gives t ∈ [0, 20). It is the CompVis interval [20k, 20(k+1)) mirrored
for diffusers' index order (the notes' "mapping pitfall"); see :func:`ddim_timestep_range`.
With ``batch_size`` B > 1 the B latents of an iteration share the concept and k (one DDIM
run) and each draws its own t from the interval.

That is ``timestep_coupling="aligned"`` (the default, and what the diffusers rewrite does:
t = timesteps[k] after k steps). ``"compvis"`` reproduces the CompVis code's coupling
(``train-esd.py`` with its patched DDIM sampler): t is drawn from the CompVis interval
[T k/N, T (k+1)/N) and the sampler runs min(N, N + 1 - k) steps, so x_t sits two DDIM
steps *less* noisy than t (k = 0 and 1 give a fully denoised x_t). Both come from one
function, :func:`erasekit.methods.receler.coupled_timesteps` (Receler's ``official`` is
``compvis`` here); see :func:`coupled_steps`.

**Which parameters train** (``parameter_set``; research notes, section 1.3), by diffusers
parameter names, all parameters (weights, biases and norms) of the selected modules
(``noxattn-linear`` excepted: Linear/Conv2d weights and biases only):

``xattn`` (ESD-x, alias ``esd-x``)
    everything inside cross-attention modules (``attn2``: to_q, to_k, to_v, to_out).
``noxattn`` (CompVis ESD-u, alias ``esd-u-compvis``)
    the CompVis ``noxattn`` set: everything except ``attn2``, the time embedding
    (``time_embedding``, ``time_emb``; SDXL's ``add_embedding``) and the output layer
    (``conv_norm_out`` and ``conv_out``, CompVis ``out.``), norms included. The ResNets'
    own time projections (``time_emb_proj``, CompVis ``emb_layers``) stay trainable, as in
    CompVis. 598 tensors (813.5 M values) on SD 1.4's layout.
``noxattn-linear`` (the diffusers rewrite's ESD-u, alias ``esd-u-diffusers``)
    HEAD ``esd_sd.py``'s ``esd-u``: the weight and bias of every ``nn.Linear`` /
    ``nn.Conv2d`` module outside ``attn2``, so ``conv_in``, ``conv_out`` and the time
    embedding train and no norm does. 388 tensors (815.4 M values) on SD 1.4's layout.
    (``esd_sdxl.py``'s experimental ``esd-u`` further keeps only ``block`` modules without
    ``emb``; that filter is not reproduced.)
``esd-u`` alone
    refused with an error naming both: the two official codes mean different sets by it.
``full`` (alias ``esd-all``)
    every UNet parameter.
``selfattn``
    everything inside self-attention (``attn1``).
``xattn-strict`` (alias ``esd-x-strict``)
    only ``attn2.to_k`` and ``attn2.to_v`` (the HEAD script's definition; the HF demo's
    filter for this name selects nothing).

**Memory.** There is no second UNet. The original values of the trained subset are kept
aside and swapped in (pointer swap under ``torch.no_grad``) for the frozen predictions,
then the trained values are swapped back; the rest of the UNet is shared and never
changes. The model is handed back exactly as it came: the trained values are returned as
weight deltas in an :class:`~erasekit.Erasure`, relative to the weights at the start (if
erasures are already applied to the model, they are part of the frozen teacher and the
new deltas go on top of them: apply the result after them).

**Precision.** ``mixed_precision="bf16"`` or ``"fp16"`` runs the UNet under CUDA autocast
with float32 master weights for the trained subset (fp16 adds a gradient scaler); on a CPU
it is ignored with a warning. A model loaded in float16/bfloat16 trains its subset in
float32 under autocast in its own dtype.

**Memory.** ``gradient_checkpointing=True`` recomputes the UNet's block activations in the
backward pass (:func:`erasekit.training.enable_gradient_checkpointing`): slower, far less memory.

**Several processes** (``accelerate launch`` / ``torchrun``): data parallel through
:class:`erasekit.training.DataParallel`. ``batch_size`` is the global batch; every process draws the
same concept, k, t and noise for all of it, samples x_t and computes the loss for its own rows, and
the gradients are averaged, so the result is one process's with the same batch (up to float
rounding). Process 0 writes the checkpoints.

**Checkpoints** go through :mod:`erasekit.training`: with ``checkpoint_dir`` every
``checkpoint_every`` iterations, and ``resume=True`` continues bit for bit (on the CPU).

Presets (``PRESETS``); each one's last line says which official script and settings it reproduces:

``paper``
    the paper's recipe (the defaults): 1000 iterations, Adam at 1e-5, batch 1, η = 1, start
    guidance 3, 50-step DDIM, x_t sampled with the trained model, fp32, ESD-x.
    Reproduces: CompVis ``train-scripts/train-esd.py`` (a2189e9) defaults, unconditional base, but aligned coupling.
``compvis``
    ``paper`` with ``timestep_coupling="compvis"``.
    Reproduces: CompVis ``train-scripts/train-esd.py`` (a2189e9) defaults with its x_t/t coupling, unconditional base.
``fast``
    200 iterations, Adam at 5e-5, η = 2 on the concept base, x_t sampled with the frozen
    model, bf16 autocast on a GPU.
    Reproduces: HEAD ``esd_sd.py`` without ``--erase_from`` (concept base, η = 2), aligned coupling; not its 1024 px.
``toy``
    for the bundled toy model: 200 iterations of ESD-x at batch 2, Adam at 3e-4, η = 1, x_t from
    10-step DDIM (what it reaches and what was tried: ``docs/toy-presets.md``).
    Reproduces: no official script; unconditional base, aligned coupling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from erasekit.erasure import Erasure
from erasekit.errors import ErasekitError
from erasekit.methods.receler import coupled_timesteps
from erasekit.models.handle import Conditioning
from erasekit.targets import EraseTarget
from erasekit import training
from erasekit.training import (
    MIXED_PRECISION, CheckpointConfig, Precision, comparable, generator_state, load_optimizer_state, optimizer_state,
    set_generator_state, weights_digest,
)

PARAMETER_SETS = ("xattn", "noxattn", "noxattn-linear", "full", "selfattn", "xattn-strict")
PARAMETER_SET_ALIASES = {
    "esd-x": "xattn", "esd-u-compvis": "noxattn", "esd-u-diffusers": "noxattn-linear", "esd-all": "full",
    "esd-x-strict": "xattn-strict",
}
# "esd-u" names two different sets in the two official codes, so it is refused, never guessed.
AMBIGUOUS_PARAMETER_SETS = {
    "esd-u": "esd-u is ambiguous: pass esd-u-compvis (noxattn: the CompVis code's ESD-u, norms trained, time embedding and "
             "conv_out frozen) or esd-u-diffusers (noxattn-linear: the diffusers rewrite's, Linear/Conv2d only, time "
             "embedding and conv_out trained, norms frozen)",
}
# Top-level UNet modules ESD-u leaves alone: the time embedding(s) and the output layer (CompVis ``time_embed``, ``out.``).
ESD_U_EXCLUDED = ("time_embedding", "time_emb", "add_embedding", "conv_norm_out", "conv_out")
SAMPLE_WITH = ("trained", "frozen")
TARGET_BASES = ("unconditional", "concept")
# ESD's name -> Receler's name of the same coupling (one implementation: receler.coupled_timesteps)
TIMESTEP_COUPLINGS = {"aligned": "aligned", "compvis": "official"}


@dataclass
class ESDConfig(CheckpointConfig):
    """ESD settings; the defaults are the paper's / CompVis code's (research notes, section 1.4)."""

    iterations: int = field(default=1000, metadata={"help": "Training iterations (optimiser steps).", "min": 1})
    learning_rate: float = field(default=1e-5, metadata={"help": "Adam learning rate of the trained parameters.", "gt": 0})
    negative_guidance: float = field(default=1.0, metadata={"help": "η: how far the target is pushed away from the concept."})
    target_base: str = field(default="unconditional", metadata={
        "help": "Base of the target: unconditional (the paper, ε*(x_t,\"\") - η Δ) or concept (the diffusers rewrite, "
                "ε*(x_t,c) - η Δ, i.e. the paper's form with η - 1); with erase_from set the base is ε*(x_t,c_f) "
                "whatever this says.",
        "choices": TARGET_BASES})
    batch_size: int = field(default=1, metadata={"help": "Latents per iteration (they share the concept and DDIM step).", "min": 1})
    start_guidance: float = field(default=3.0, metadata={"help": "Classifier-free guidance while sampling x_t."})
    ddim_steps: int = field(default=50, metadata={"help": "Steps of the DDIM schedule (eta 0) x_t is sampled on.", "min": 1})
    timestep_coupling: str = field(default="aligned", metadata={
        "help": "How t follows the DDIM index k: aligned (x_t after k steps, t from the slice holding timesteps[k]) or compvis (the "
                "CompVis code: t from [T k/N, T(k+1)/N), x_t after min(N, N+1-k) steps, two steps less noisy than t).",
        "choices": tuple(TIMESTEP_COUPLINGS)})
    resolution: int | None = field(default=None, metadata={
        "help": "Image side in pixels (none: the model's default).", "min": 1})
    parameter_set: str = field(default="xattn", metadata={
        "help": "Which UNet parameters train: xattn (ESD-x), noxattn (CompVis ESD-u), noxattn-linear (the diffusers "
                "rewrite's ESD-u), full, selfattn or xattn-strict (esd-u alone is ambiguous and refused).",
        "choices": (*PARAMETER_SETS, *PARAMETER_SET_ALIASES)})
    sample_with: str = field(default="trained", metadata={
        "help": "Which model samples x_t: trained (the paper) or frozen (the diffusers rewrite).", "choices": SAMPLE_WITH})
    erase_from: str | None = field(default=None, metadata={
        "help": "Erase the concept from this broader prompt c_f instead of from itself (none: from itself)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute UNet activations in the backward pass to save memory."})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "CUDA autocast precision: bf16 or fp16 (none: float32; ignored on a CPU).", "choices": ("bf16", "fp16")})
    seed: int = field(default=0, metadata={"help": "Seed of the concept, timestep and noise draws."})


CONFIG = ESDConfig
DATA_PARALLEL = True  # several processes split each batch (erasekit.training.DataParallel)

PRESETS = {
    "paper": {},
    "compvis": {"timestep_coupling": "compvis"},
    "fast": {"iterations": 200, "learning_rate": 5e-5, "negative_guidance": 2.0, "target_base": "concept",
             "sample_with": "frozen", "mixed_precision": "bf16"},
    "toy": {"iterations": 200, "learning_rate": 3e-4, "negative_guidance": 1.0, "batch_size": 2, "ddim_steps": 10},
}



# ---------------------------------------------------------------------------- parameter sets
def canonical_parameter_set(parameter_set: str) -> str:
    """The canonical name of a parameter set or alias; "esd-u" and unknown names are refused (one line)."""
    if parameter_set in AMBIGUOUS_PARAMETER_SETS:
        raise ErasekitError(f"ESD parameter_set {AMBIGUOUS_PARAMETER_SETS[parameter_set]}")
    kind = PARAMETER_SET_ALIASES.get(parameter_set, parameter_set)
    if kind not in PARAMETER_SETS:
        choices = ", ".join([*PARAMETER_SETS, *PARAMETER_SET_ALIASES])
        raise ErasekitError(f"unknown ESD parameter_set {parameter_set!r}; choose one of: {choices}")
    return kind


def select_parameters(unet: torch.nn.Module, parameter_set: str) -> list[str]:
    """Names of the UNet parameters that ``parameter_set`` trains (see the module docstring)."""
    kind = canonical_parameter_set(parameter_set)
    # noxattn-linear: the parameters of Linear/Conv2d modules (diffusers' LoRACompatible ones subclass them)
    linear = {
        f"{module_name}.{name}" if module_name else name
        for module_name, module in unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "attn2" not in module_name.split(".")
        for name, _ in module.named_parameters(recurse=False)
    } if kind == "noxattn-linear" else set()
    selected = []
    for name, _ in unet.named_parameters():
        parts = name.split(".")
        if kind == "xattn":
            keep = "attn2" in parts
        elif kind == "selfattn":
            keep = "attn1" in parts
        elif kind == "xattn-strict":
            keep = any(a == "attn2" and b in ("to_k", "to_v") for a, b in zip(parts, parts[1:]))
        elif kind == "noxattn":
            keep = "attn2" not in parts and parts[0] not in ESD_U_EXCLUDED
        elif kind == "noxattn-linear":
            keep = name in linear
        else:  # full
            keep = True
        if keep:
            selected.append(name)
    if not selected:
        raise ErasekitError(f"parameter_set {parameter_set!r} selects no parameter of this UNet; try parameter_set=full")
    return selected


# -------------------------------------------------------------------- DDIM index -> DDPM t
def ddim_timestep_range(index: int, ddim_steps: int, num_train_timesteps: int = 1000) -> tuple[int, int]:
    """[low, high) of the DDPM timesteps whose noise level the latent has after ``index`` DDIM steps.

    diffusers runs timesteps downwards, so step ``index`` of ``ddim_steps`` owns the
    ``index``-th slice of [0, T) counted from the top: index 0 (pure noise) gives
    [T - T/N, T), index N-1 gives [0, T/N). ``scheduler.timesteps[index]`` lies inside.
    """
    _, low, high = coupled_timesteps(index, ddim_steps, num_train_timesteps, "aligned")
    return low, high


def coupled_steps(index: int, ddim_steps: int, num_train_timesteps: int, coupling: str) -> tuple[int, int, int]:
    """(DDIM steps run to make x_t, low, high) for DDIM index ``index``; t is drawn from [low, high).

    ``aligned``: ``index`` steps, the interval of :func:`ddim_timestep_range` (it holds
    ``scheduler.timesteps[index]``). ``compvis``: min(N, N + 1 - index) steps and the CompVis
    interval [T index / N, T (index + 1) / N), so x_t is two DDIM steps less noisy than t
    (index 0 and 1: a fully denoised x_t). One implementation, Receler's
    :func:`erasekit.methods.receler.coupled_timesteps` (its ``official`` is ``compvis`` here).
    """
    if coupling not in TIMESTEP_COUPLINGS:
        raise ErasekitError(f"timestep_coupling must be one of {', '.join(TIMESTEP_COUPLINGS)}, not {coupling!r}")
    return coupled_timesteps(index, ddim_steps, num_train_timesteps, TIMESTEP_COUPLINGS[coupling])


def sample_training_timesteps(index: int, ddim_steps: int, num_train_timesteps: int, batch: int,
                              generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch`` DDPM timesteps drawn uniformly from :func:`ddim_timestep_range` (int64, CPU)."""
    low, high = ddim_timestep_range(index, ddim_steps, num_train_timesteps)
    return torch.randint(low, high, (batch,), generator=generator)


@torch.no_grad()
def sample_x_t(model, cond: Conditioning, uncond: Conditioning, index: int, noise: torch.Tensor, *,
               ddim_steps: int, guidance: float, scheduler=None) -> torch.Tensor:
    """The latent after ``index`` steps of ``ddim_steps``-step DDIM (eta 0) from ``noise``, with CFG ``guidance``.

    It sits at ``scheduler.timesteps[index]``: index 0 returns the noise itself, index
    ``ddim_steps`` the fully denoised sample (the compvis coupling's k = 0 and 1).
    """
    return model.sample(
        cond, uncond=uncond, guidance=guidance, num_inference_steps=ddim_steps,
        scheduler=scheduler if scheduler is not None else "DDIMScheduler", latents=noise, stop_step=index,
    )


# ------------------------------------------------------------------------------- training
def _check_config(config: ESDConfig) -> None:
    if config.iterations < 1 or config.batch_size < 1 or config.ddim_steps < 1:
        raise ErasekitError("ESD needs iterations, batch_size and ddim_steps of at least 1")
    if config.learning_rate <= 0:
        raise ErasekitError(f"learning_rate must be positive, not {config.learning_rate}")
    if config.sample_with not in SAMPLE_WITH:
        raise ErasekitError(f"sample_with must be one of {SAMPLE_WITH}, not {config.sample_with!r}")
    if config.mixed_precision not in MIXED_PRECISION:
        raise ErasekitError(f"mixed_precision must be None, 'bf16' or 'fp16', not {config.mixed_precision!r}")
    if config.checkpoint_dir is not None and config.checkpoint_every < 1:
        raise ErasekitError("checkpoint_every must be at least 1")
    if config.resume and config.checkpoint_dir is None:
        raise ErasekitError("resume=True needs checkpoint_dir: the folder the interrupted run wrote its checkpoints to")
    if config.erase_from is not None and not config.erase_from.strip():
        raise ErasekitError("erase_from is empty; pass the broader prompt to erase from, or None")
    if config.target_base not in TARGET_BASES:
        raise ErasekitError(f"target_base must be one of {', '.join(TARGET_BASES)}, not {config.target_base!r}")
    if config.timestep_coupling not in TIMESTEP_COUPLINGS:
        raise ErasekitError(
            f"timestep_coupling must be one of {', '.join(TIMESTEP_COUPLINGS)}, not {config.timestep_coupling!r}")
    # (parameter_set is checked where it is resolved, ESDTrainer.select_parameter_names, before anything changes)


class ESDTrainer:
    """One ESD run on a model handle: ``train()``, then ``deltas()``, then always ``close()``.

    Between construction and ``close()`` the UNet holds the trained values of the selected
    parameters; ``frozen()`` swaps the original values in for the teacher's predictions.
    :func:`erase` drives it; tests and notebooks can call ``step``/``train_step`` directly.
    """

    name = "esd"  # of the checkpoints and the progress bar

    def __init__(self, model, concepts: list[str], config: ESDConfig):
        self.check_config(config)
        if not concepts:
            raise ErasekitError("no concept to erase; pass at least one concept")
        self.model, self.concepts, self.config = model, concepts, config
        self.dtype = model.dtype  # before the trained subset may be upcast
        self.device = model.device
        unet = model.unet
        parameters = self.candidate_parameters()
        self.parameter_names = self.select_parameter_names()

        # precision: float32 master weights for the trained subset, autocast for half precision
        self.precision = Precision(config.mixed_precision, self.device, self.dtype)

        # conditioning, encoded once (before the UNet is touched)
        self.cond = [model.encode([c]) for c in self.concepts]
        self.uncond = model.encode([""])
        self.erase_from = model.encode([config.erase_from]) if config.erase_from else None
        self.scheduler = model.make_scheduler("DDIMScheduler")
        self.num_train_timesteps = int(model.scheduler.config.num_train_timesteps)
        self.latent_shape = model.latent_shape(config.batch_size, config.resolution)  # the global batch
        self.parallel = training.DataParallel(config.batch_size, self.device)  # this process's rows of it

        self.generator = torch.Generator().manual_seed(config.seed)
        self.iteration = 0
        self.losses: list[float] = []
        self.concept_counts = [0] * len(self.concepts)

        # the trained subset: its original tensors are set aside (the frozen teacher), the
        # parameters get float32 copies; the rest of the UNet is shared by both and never changes
        self.parameters = {name: parameters[name] for name in self.parameter_names}
        self.frozen_values: dict[str, torch.Tensor] = {}
        self._candidates = parameters
        self._requires_grad = {name: p.requires_grad for name, p in parameters.items()}
        self._restore_checkpointing = lambda: None
        self._closed = False
        try:
            for parameter in parameters.values():
                parameter.requires_grad_(False)
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    self.frozen_values[name] = parameter.data
                    parameter.data = parameter.data.to(torch.float32, copy=True)
                    parameter.requires_grad_(True)
            self._restore_checkpointing = training.enable_gradient_checkpointing(unet, config.gradient_checkpointing)
            self.optimizer = torch.optim.Adam(list(self.parameters.values()), lr=config.learning_rate)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------- what trains (a subclass may widen it)
    def check_config(self, config) -> None:
        _check_config(config)

    def candidate_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters a parameter set may pick from, by their names in the erasure: the UNet's."""
        return dict(self.model.unet.named_parameters())

    def select_parameter_names(self) -> list[str]:
        return select_parameters(self.model.unet, self.config.parameter_set)

    def parameter_set_name(self) -> str:
        return canonical_parameter_set(self.config.parameter_set)

    # --------------------------------------------------------------- the frozen model
    @contextlib.contextmanager
    def frozen(self):
        """Inside, the UNet is the original model θ*: the trained subset's original values are swapped in."""
        trained = {}
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                trained[name] = parameter.data
                parameter.data = self.frozen_values[name]
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    parameter.data = trained[name]

    def autocast(self):
        return self.precision.autocast()

    # ------------------------------------------------------------------- one update
    def target(self, x_t: torch.Tensor, t: torch.Tensor, concept_index: int) -> torch.Tensor:
        """base - η (ε*(x_t, c) - ε*(x_t, "")) from the frozen model, without gradients.

        base is ε*(x_t, c_f) with ``erase_from``; otherwise ε*(x_t, "") (``target_base="unconditional"``,
        the paper) or ε*(x_t, c) (``"concept"``, the diffusers rewrite).
        """
        batch = x_t.shape[0]
        conds = [self.cond[concept_index].repeat(batch), self.uncond.repeat(batch)]
        if self.erase_from is not None:
            conds.append(self.erase_from.repeat(batch))
        with torch.no_grad(), self.frozen(), self.autocast():
            eps = self.model.predict_noise(torch.cat([x_t] * len(conds)), t.repeat(len(conds)), Conditioning.cat(conds))
            eps = eps.float().chunk(len(conds))
        eps_concept, eps_empty = eps[0], eps[1]
        if self.erase_from is not None:
            base = eps[2]
        else:
            base = eps_concept if self.config.target_base == "concept" else eps_empty
        return base - self.config.negative_guidance * (eps_concept - eps_empty)

    def train_step(self, x_t: torch.Tensor, t: torch.Tensor, concept_index: int) -> float:
        """One Adam step on L = || ε_θ(x_t, c or c_f, t) - target ||² (mean squared error); returns L."""
        t = t.to(self.device)
        target = self.target(x_t, t, concept_index)
        trained_cond = self.erase_from if self.erase_from is not None else self.cond[concept_index]
        with self.autocast():
            prediction = self.model.predict_noise(x_t, t, trained_cond.repeat(x_t.shape[0]))
        loss = F.mse_loss(prediction.float(), target)
        self.precision.step(loss, self.optimizer, sync=lambda: self.parallel.average_gradients(self.parameters.values()))
        return self.parallel.mean([float(loss.detach())])[0]  # (several processes: the global batch's loss)

    def draw(self) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """This iteration's random choices: concept index, DDIM steps to run for x_t, timesteps t, starting noise.

        A DDIM index k is drawn uniformly from {0 .. ddim_steps-1}; :func:`coupled_steps` turns it
        into the steps to run and t's interval under ``timestep_coupling`` (aligned: k steps).
        """
        config, generator = self.config, self.generator
        concept_index = int(torch.randint(len(self.concepts), (1,), generator=generator))
        index = int(torch.randint(config.ddim_steps, (1,), generator=generator))
        steps, low, high = coupled_steps(index, config.ddim_steps, self.num_train_timesteps, config.timestep_coupling)
        t = torch.randint(low, high, (config.batch_size,), generator=generator)
        noise = torch.randn(self.latent_shape, generator=generator) * getattr(self.scheduler, "init_noise_sigma", 1.0)
        return concept_index, steps, t, noise.to(self.device, self.dtype)

    def step(self) -> float:
        """One ESD iteration: draw, sample x_t, one update (on this process's rows of the batch)."""
        config = self.config
        concept_index, steps, t, noise = self.draw()
        rows = self.parallel.rows
        t, noise = t[rows], noise[rows]
        batch = self.parallel.local_batch
        source = self.erase_from if self.erase_from is not None else self.cond[concept_index]
        sampler = self.frozen() if config.sample_with == "frozen" else contextlib.nullcontext()
        with torch.no_grad(), sampler, self.autocast():
            x_t = sample_x_t(
                self.model, source.repeat(batch), self.uncond.repeat(batch), steps, noise,
                ddim_steps=config.ddim_steps, guidance=config.start_guidance, scheduler=self.scheduler,
            )
        loss = self.train_step(x_t.to(self.dtype), t, concept_index)
        self.iteration += 1
        self.losses.append(loss)
        self.concept_counts[concept_index] += 1
        return loss

    def train(self, progress: bool = True) -> None:
        """Run (or continue) to ``config.iterations``, checkpointing on the way if asked (:func:`erasekit.training.run`)."""
        training.run(self, self.name, f"{self.name} {', '.join(self.concepts)}", progress, lambda loss: {"loss": f"{loss:.4f}"})

    # ------------------------------------------------------------------- the result
    def deltas(self) -> dict[str, torch.Tensor]:
        """Trained minus original value of every trained parameter (float32, CPU)."""
        return {
            name: (parameter.detach().float() - self.frozen_values[name].float()).cpu()
            for name, parameter in self.parameters.items()
        }

    def erasure(self, deltas: dict[str, torch.Tensor], config: dict, info: dict) -> Erasure:
        """The erasure of a finished run (after ``close``): its weight deltas."""
        return Erasure.from_deltas(self.model, self.name, self.concepts, config, deltas=deltas, info=info)

    def close(self) -> None:
        """Hand the model back exactly as it came (original tensors, flags, checkpointing)."""
        if self._closed:
            return
        self._closed = True
        with torch.no_grad():
            for name, value in self.frozen_values.items():
                self.parameters[name].data = value
                self.parameters[name].grad = None
        for name, parameter in self._candidates.items():
            parameter.requires_grad_(self._requires_grad.get(name, False))
        self._restore_checkpointing()
        if hasattr(self, "optimizer"):
            self.optimizer.state.clear()

    def summary(self) -> dict:
        """What goes into the erasure's ``info``."""
        window = max(1, len(self.losses) // 50)
        curve = [round(sum(self.losses[i : i + window]) / len(self.losses[i : i + window]), 6)
                 for i in range(0, len(self.losses), window)]
        return {
            "iterations": self.iteration,
            "parameter_set": self.parameter_set_name(),
            "trained_parameters": sum(p.numel() for p in self.parameters.values()),
            "trained_tensors": len(self.parameters),
            "loss_curve": curve,
            "loss_window": window,
            "concept_counts": dict(zip(self.concepts, self.concept_counts)),
            "precision": str(self.precision.compute_dtype or self.dtype).replace("torch.", ""),
            "device": self.device.type,
            "processes": self.parallel.world_size,
            "on_top_of": [e.fingerprint for e, _ in self.model.applied_erasures],
        }

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_key(self) -> dict:
        """Everything that determines the run: concepts, settings (less iterations), the teacher's weights (every
        UNet and text-encoder weight, the trained subset at its base values)."""
        return {"method": "esd", "concepts": self.concepts, "config": comparable(dataclasses.asdict(self.config)),
                "base": weights_digest({**self.model.weight_parameters(), **self.frozen_values}),
                "on_top_of": [(e.digest, scale) for e, scale in self.model.applied_erasures]}

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON) that let a run continue bit for bit: trained values, Adam, RNG, history."""
        tensors = {f"trained.{name}": parameter for name, parameter in self.parameters.items()}
        adam, adam_values = optimizer_state("adam", self.optimizer)
        tensors.update(adam)
        state = {"iteration": self.iteration, "generator": generator_state(self.generator), "losses": self.losses,
                 "concept_counts": self.concept_counts, "adam": adam_values, "grad_scaler": self.precision.state()}
        return tensors, state

    def load_state(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                parameter.data.copy_(tensors[f"trained.{name}"].to(parameter.device))
        load_optimizer_state("adam", self.optimizer, tensors, state["adam"])
        set_generator_state(self.generator, state["generator"])
        self.iteration, self.losses = int(state["iteration"]), list(state["losses"])
        self.concept_counts = list(state["concept_counts"])
        self.precision.load_state(state["grad_scaler"])


def erase(model, targets: list[EraseTarget], config: ESDConfig | None = None, progress: bool = True) -> Erasure:
    """Erase the targets' concepts by ESD training (each concept's own prompt, ``target.prompts[0]``).

    Several concepts train in one run, one drawn per iteration. ESD has no preservation
    term, so a target's ``preserve`` must be empty. The model is returned unchanged.
    """
    config = config or ESDConfig()
    concepts = [t.concept for t in targets]
    if any(t.preserve for t in targets):
        raise ErasekitError(
            "ESD has no preserve term (its loss only pushes the erased concept away); drop the preserve prompts, "
            "or use a method that preserves (uce, rece)"
        )
    return train_erasure(ESDTrainer, model, concepts, config, progress)


def train_erasure(trainer_class, model, what, config, progress: bool = True) -> Erasure:
    """Build a trainer on ``what`` (ESD: concepts; adv: targets), run it and hand the model back: the erasure of its deltas."""
    started = time.time()
    trainer = trainer_class(model, what, config)
    try:
        trainer.train(progress=progress)
        trained = trainer.deltas()
        info = trainer.summary()
    finally:
        trainer.close()
    info["seconds"] = round(time.time() - started, 2)
    return trainer.erasure(trained, dataclasses.asdict(config), info)
