"""CPE: Concept Pinpoint Eraser (Lee et al., ICLR 2025), residual attention gates on cross-attention K/V.

CPE leaves every UNet weight alone. It adds, for each erased concept c, a **Residual Attention
Gate** (ResAG) to the key and value projection of every cross-attention layer, so that the
projection of the text embedding E (tokens x d) becomes (research notes, B1)::

    W_ℓ E + ResAG_ℓ(E),     ResAG_ℓ(E)(t) = (α/r) · g_c(t) · Ē_c(t) · D_ℓ · U_ℓ

with, for every token t,

    Q = E A_c            (A_c: d x r_g, the "gate rank")
    S = softmax_row(Q Qᵀ) (no 1/√r_g; ``gate_key_projection=True`` uses Q (E A_key)ᵀ instead)
    Ē_c = S E            (each token becomes a mix of all tokens; no value projection)
    g_c(t) = σ(s_cᵀ Ē_c(t))  in (0, 1)

The gate network (A_c, s_c) is **shared by all projections** of a concept; every projection has
its own low-rank pair D_ℓ (d x r, uniform(±1/√(d·r)): the official kaiming-uniform init of a (1, d, r)
tensor) and U_ℓ (r x out_ℓ, zero). s_c starts at zero (every gate at 0.5), A_c uniform(±1/√(d·r_g)/d²)
(the official kaiming-uniform divided by d², 1.5e-8 on SD: S uniform) and U_ℓ at zero, so a
fresh ResAG adds exactly nothing. Nothing depends on the image or the timestep.

**Training** (research notes, B2) uses only the K/V projections' outputs; there are no UNet passes.
With c_ℓ the per-layer weight (keys: σ_max(W_o W_v) σ_max(W_q) / T, values: σ_max(W_o), T the
text length) and L the number of projections, every loss has the form

    (1/L) Σ_ℓ c_ℓ · mean_{tokens, channels} ‖ W_ℓ x − ResAG_ℓ(input) ‖²

* erase: input e_t, x = (1+g)(e_n − e_t): W̃(e_t) goes to W e_n + g (W e_n − W e_t), with e_t / e_n
  a random template filled with the concept / the neutral word, g = ``guidance``;
* anchoring (weight λ = ``anchor_weight``): input a, x = 0, over a batch of anchors: ``2B`` cached
  anchor prompts, each plus Gaussian noise of std ``anchor_noise``·‖a‖_F, mixed pairwise with
  λ ~ Beta(1, 1) into B = ``anchor_batch_size`` anchors;
* adversarial (weight ``adversarial_weight``, from stage 1 on): input e_t + δ_j, x = (1+g)(e_n − e_t) − δ_j,
  averaged over the N = ``adversarial_embeddings`` perturbations δ_j of the latest attack;
* attack (after each stage but the last, ResAG frozen): input e_t + δ_j, x = −δ_j, i.e. the δ_j
  (full-sequence, unconstrained, initialised ≈ 0) that bring W̃(e_t + δ_j) back to W e_t.

Stage 0 runs ``first_stage_iterations`` at ``first_stage_learning_rate`` (cosine with
``first_stage_cycles`` hard restarts), stages 1.. run ``iterations`` at ``learning_rate`` (one
cycle), each after ``warmup_steps`` of linear warm-up; each attack runs ``adversarial_iterations`` at
``adversarial_learning_rate`` (one cycle) after its own ``adversarial_warmup_steps`` (the official
``lr_warmup_steps_adv``); AdamW throughout (the paper's 8-bit AdamW is a memory saving, not part of the method).
The paper runs a last attack after the last stage whose result is never used; it is skipped here.
W_ℓ are the projections' current weights: weight erasures already applied to the model (UCE,
ESD, ...) are part of the frozen model CPE trains against, so apply the CPE erasure after them.

**How the losses are computed.** ‖W x − R‖² = x WᵀW xᵀ − 2 x Wᵀ Uᵀ hᵀ + h U Uᵀ hᵀ with h = (α/r) g Ē D.
Summed over layers the first term needs one d x d matrix, Σ_ℓ c_ℓ/(L·out_ℓ) W_ℓᵀ W_ℓ, and the
others only the rank-r products W_ℓᵀ U_ℓᵀ and U_ℓ U_ℓᵀ, so a training step never forms the
projections' outputs (the same numbers, ~17x faster on SD 1.x on a CPU; see
:class:`KVProjections` and ``benchmarks/bench_cpe.py``).

**Several concepts.** Each concept's ResAG is trained on its own (same seed), then stacked on a
concept axis. At inference every token is routed to the concept with the highest gate g_c(t),
and only that concept's residual is added (top-1 routing, B1). Routing spans every CPE erasure
applied to the model: one ``"cpe"`` kv hook per cross-attention layer (see
:mod:`erasekit.models.attention`) serves them all. The routed gate outputs are computed once per
text-states tensor and reused by every layer and projection; the cache holds a reference to that
tensor and checks its address, shape, strides, dtype and in-place version, so it never serves
another input.

**Anchors and templates** come from the target (:mod:`erasekit.targets`, by the concept's kind):
its neutral word e_n, its templates (plus ``extra_templates``; ``max_templates`` keeps a seeded
subset), the anchor names it always keeps and the user's ``--preserve`` names (each put in every
template where the kind says so), the ``similar_anchors`` candidates whose bare-name text states
are most cosine-similar to the concept's, and anchor prompts used as written. Names containing
the concept are dropped. ``templates`` and ``anchors_file`` replace the target's lists with a file.

Presets: ``paper`` and ``celebrity`` (the defaults: r = 1, r_g = 16, g = 0.3, λ = 1e5, 5 stages),
``artist`` (g = 0.5, λ = 1e4, 10 stages, 16 anchors), ``explicit`` (r = 4, r_g = 64, g = 3,
λ = 1e4, 20 stages of 1,200 iterations, 32 perturbations), ``toy`` (g = 3, λ = 1e3, 3 short stages at
10x the learning rates, 8 perturbations, 24 templates: one shape in ~15 s on one CPU core).

On disk (``module.<name>`` tensors of the :class:`~erasekit.Erasure`, leading axis = concept):
``gate.query`` (C, d, r_g), ``gate.scaler`` (C, d), ``gate.key`` (C, d, r_g; only with
``gate_key_projection``), ``alpha`` (C,), and per projection ``<attn path>.to_k.down`` (C, d, r),
``<attn path>.to_k.up`` (C, r, out), likewise ``.to_v``.

**Checkpoints** (``checkpoint_dir``, :mod:`erasekit.training`): the run's full state is saved every
``checkpoint_every`` optimiser steps; ``resume=True`` continues it to the uninterrupted result, bit for bit on the CPU.

**Precision, memory, several processes.** CPE never runs the UNet, so the other trained methods'
``mixed_precision`` and ``gradient_checkpointing`` switches have nothing to act on: its memory is the
model, the K/V matrices and the templates' and anchors' text states (float32). A step is one template
and a batch of anchors through the K/V side, too small to split, so under ``torchrun`` / ``accelerate
launch`` CPE runs on process 0 alone (:func:`erasekit.methods.run_method`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from erasekit.erasure import Erasure, model_signature
from erasekit.errors import ErasekitError
from erasekit.modules.cpe import ResAG
from erasekit.targets import EraseTarget, read_list, require
from erasekit.training import (
    CheckpointConfig, comparable, generator_state, load_optimizer_state, optimizer_state, resume_or_start,
    set_generator_state, weights_digest,
)

# iterations sets the stages' LR schedules, so unlike ESD a resumed CPE run may change only these
RESUMABLE_CHANGES = ("checkpoint_every", "checkpoint_dir", "resume")


def _help(text: str, **checks) -> dict:
    return {"help": text, **checks}


@dataclass
class CPEConfig(CheckpointConfig):
    """CPE settings; the defaults are the paper code's celebrity settings (research notes, B3).

    ``checkpoint_every`` counts the run's optimiser steps: erase and attack steps, over all concepts and stages.
    """

    templates: str | None = field(default=None, metadata=_help(
        "Prompt templates with '{}' (a file or a bundled list: person, art, explicit, object); None: the target's."))
    anchors_file: str | None = field(default=None, metadata=_help(
        "Candidate anchor names (a file or a bundled list: people, artists, objects, sentences); None: the target's."))
    similar_anchors: int = field(default=50, metadata=_help(
        "Keep this many candidate anchors, the most similar to the concept (0: all).", min=0))
    max_templates: int = field(default=0, metadata=_help("Use at most this many templates, a seeded subset (0: all).", min=0))
    rank: int = field(default=1, metadata=_help("r of each projection's D U.", min=1))
    gate_rank: int = field(default=16, metadata=_help("r_g of the gate's query projection A.", min=1))
    alpha: float = field(default=1.0, metadata=_help("α: the residual is scaled by α/r."))
    guidance: float = field(default=0.3, metadata=_help("g: the erase target is W e_n + g (W e_n - W e_t)."))
    anchor_weight: float = field(default=1e5, metadata=_help("λ_anc, the anchoring loss weight ('pal').", min=0))
    anchor_batch_size: int = field(default=32, metadata=_help("B anchors a step (2B drawn, then mixed in pairs).", min=1))
    anchor_noise: float = field(default=1e-3, metadata=_help("Std of the anchors' noise, relative to ‖a‖_F.", min=0))
    anchor_mixup: bool = field(default=True, metadata=_help("Mix the 2B noisy anchors in pairs, λ ~ Beta(1, 1)."))
    stages: int = field(default=5, metadata=_help("Erase stages (each but the last followed by an attack).", min=1))
    iterations: int = field(default=450, metadata=_help("Erase iterations a stage from stage 1 on.", min=0))
    first_stage_iterations: int = field(default=1800, metadata=_help("Erase iterations of stage 0.", min=0))
    learning_rate: float = field(default=3e-5, metadata=_help("AdamW's learning rate, stages 1 on.", min=0))
    first_stage_learning_rate: float = field(default=3e-4, metadata=_help("AdamW's learning rate, stage 0.", min=0))
    first_stage_cycles: int = field(default=2, metadata=_help("Hard restarts of stage 0's cosine schedule.", min=1))
    warmup_steps: int = field(default=5, metadata=_help("Linear warm-up of every erase stage's schedule.", min=0))
    adversarial_warmup_steps: int = field(default=5, metadata=_help(
        "Linear warm-up of every attack's schedule (the official lr_warmup_steps_adv: 5 in every setting).", min=0))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW's weight decay.", min=0))
    adversarial_embeddings: int = field(default=16, metadata=_help(
        "N perturbations δ an attack (0: no adversarial training).", min=0))
    adversarial_iterations: int = field(default=450, metadata=_help("Attack iterations.", min=0))
    adversarial_learning_rate: float = field(default=1e-2, metadata=_help("The attack's Adam learning rate.", min=0))
    adversarial_weight: float = field(default=1.0, metadata=_help("Weight of the adversarial erase term ('adv_coef').", min=0))
    gate_key_projection: bool = field(default=False, metadata=_help(
        "The gate uses Q (E A_key)ᵀ, the code's intent, instead of Q Qᵀ (released behaviour)."))
    seed: int = field(default=2024, metadata=_help("Seed of initialisation, anchors and template subsets."))
    extra_templates: list[str] = field(default_factory=list, metadata=_help("More templates with '{}', added to the target's."))


CONFIG = CPEConfig

PRESETS = {
    # the official train/train_cpe.py, celebrity settings (research notes B3): r 1, r_g 16, g 0.3, pal 1e5, 5 stages
    "paper": {},
    "celebrity": {},
    # train/train_cpe.py, artist settings (B3): g 0.5, pal 1e4, 10 stages, 16 anchors a step
    "artist": {"guidance": 0.5, "anchor_weight": 1e4, "stages": 10, "anchor_batch_size": 16},
    # train/train_cpe.py, explicit settings (B3; pal 1e4 as the shell script and released folder, not the yaml's 1e5):
    # r 4, r_g 64, g 3, 20 stages of 1,200 iterations, 32 δ, warm-up 10 (erase) and 5 (lr_warmup_steps_adv)
    "explicit": {
        "rank": 4, "gate_rank": 64, "guidance": 3.0, "anchor_weight": 1e4, "stages": 20,
        "iterations": 1200, "first_stage_iterations": 2400, "adversarial_iterations": 1200, "adversarial_embeddings": 32,
        "anchor_batch_size": 16, "warmup_steps": 10, "similar_anchors": 0,
    },
    # no official script: tuned on the bundled toy model (docs/toy-presets.md)
    "toy": {
        "guidance": 3.0, "anchor_weight": 1e3, "stages": 3, "first_stage_iterations": 600,
        "iterations": 200, "first_stage_learning_rate": 3e-3, "learning_rate": 3e-4, "adversarial_embeddings": 8,
        "adversarial_iterations": 100, "anchor_batch_size": 16, "max_templates": 24,
    },
}


# ------------------------------------------------------------------------- the frozen K/V side
@dataclass
class KVProjections:
    """The frozen to_k/to_v matrices of every cross-attention layer and CPE's per-layer loss weights.

    ``lipschitz`` holds c_ℓ (keys: σ_max(W_o W_v) σ_max(W_q) / T; values: σ_max(W_o)) and
    ``gram`` = Σ_ℓ w_ℓ W_ℓᵀ W_ℓ with w_ℓ = c_ℓ / (L · out_ℓ), so that
    (1/L) Σ_ℓ c_ℓ mean ‖W_ℓ x‖² = mean_t x_t · gram · x_tᵀ.
    """

    names: list[str]  # "<attn path>.to_k" / ".to_v", in UNet order
    weights: list[torch.Tensor]  # W_ℓ (out_ℓ, d), float32
    lipschitz: torch.Tensor  # c_ℓ (L,)
    layer_weights: torch.Tensor  # w_ℓ = c_ℓ / (L out_ℓ)
    gram: torch.Tensor  # (d, d)
    tokens: int

    @classmethod
    def from_layers(cls, layers: dict[str, torch.nn.Module], tokens: int, device=None) -> "KVProjections":
        """From the cross-attention modules by path (``ModelHandle.cross_attention_layers()``), current weights."""
        if not layers:
            raise ErasekitError("the model has no cross-attention layers; CPE needs a text-conditioned UNet")
        names, weights, lipschitz = [], [], []
        with torch.no_grad():
            for path, attn in layers.items():
                device = device or attn.to_k.weight.device
                w_q, w_k, w_v = (attn.to_q.weight.float().to(device), attn.to_k.weight.float().to(device),
                                 attn.to_v.weight.float().to(device))
                w_o = attn.to_out[0].weight.float().to(device)
                c_key = spectral_norm(w_o.double() @ w_v.double()) * spectral_norm(w_q) / tokens
                names += [f"{path}.to_k", f"{path}.to_v"]
                weights += [w_k.clone(), w_v.clone()]
                lipschitz += [c_key, spectral_norm(w_o)]
            c = torch.tensor(lipschitz, dtype=torch.float32, device=device)
            layer_weights = c / (len(names) * torch.tensor([w.shape[0] for w in weights], dtype=torch.float32, device=device))
            gram = sum(w_l * (w.T @ w) for w_l, w in zip(layer_weights, weights))
        return cls(names, weights, c, layer_weights, gram, tokens)

    @classmethod
    def from_model(cls, model) -> "KVProjections":
        return cls.from_layers(model.cross_attention_layers(), model.max_length, model.device)

    @property
    def dim(self) -> int:
        return self.weights[0].shape[1]

    @property
    def out_dims(self) -> list[int]:
        return [w.shape[0] for w in self.weights]

    def factors(self, resag: ResAG) -> tuple[torch.Tensor, torch.Tensor]:
        """W_ℓᵀ U_ℓᵀ stacked (L, d, r) and U_ℓ U_ℓᵀ stacked (L, r, r): all the loss needs of the U_ℓ."""
        wu = torch.stack([(up @ w).T for up, w in zip(resag.up, self.weights)])
        uu = torch.stack([up @ up.T for up in resag.up])
        return wu, uu

    def losses(self, z: torch.Tensor, down: torch.Tensor, factors, x: torch.Tensor | None = None) -> torch.Tensor:
        """Per sample: (1/L) Σ_ℓ c_ℓ mean_{t, channels} ‖W_ℓ x − z D_ℓ U_ℓ‖², shape (B,).

        ``z`` (B, T, d) is :meth:`ResAG.mixed` of the inputs, ``down`` the D_ℓ (L, d, r), ``factors``
        from :meth:`factors`; ``x`` (M, T, d) with M <= B belongs to the first M samples (x = 0 for the rest).
        """
        wu, uu = factors
        h = torch.einsum("btd,ldr->btlr", z, down)
        per_layer = torch.einsum("btlr,lrs,btls->bl", h, uu, h)
        if x is not None:
            m = x.shape[0]
            cross = torch.einsum("btd,ldr,btlr->bl", x, wu, h[:m])
            per_layer = torch.cat([per_layer[:m] - 2 * cross, per_layer[m:]])
        total = per_layer @ self.layer_weights
        if x is not None:
            quadratic = torch.einsum("btd,de,bte->b", x, self.gram, x)
            total = torch.cat([total[: x.shape[0]] + quadratic, total[x.shape[0]:]])
        return total / z.shape[1]

    def direct_losses(self, resag: ResAG, inputs: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The same numbers as :meth:`losses`, from the projections' outputs (slow; for checking)."""
        z = resag.mixed(inputs)
        total = 0
        for index, (w, c) in enumerate(zip(self.weights, self.lipschitz)):
            residual = z @ resag.down[index] @ resag.up[index]
            target = torch.zeros_like(residual) if x is None else x @ w.T
            total = total + c * (target - residual).pow(2).mean(dim=(1, 2))
        return total / len(self.weights)


def spectral_norm(matrix: torch.Tensor) -> float:
    """σ_max, as the square root of the top eigenvalue of the smaller Gram matrix (float64, CPU; 2x faster than an SVD)."""
    m = matrix.detach().double().cpu()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return float(torch.linalg.eigvalsh(gram)[-1].clamp_min(0).sqrt())


# ------------------------------------------------------------------------------------ training
def cosine_with_restarts(warmup: int, total: int, cycles: int = 1):
    """Linear warm-up over ``warmup`` steps, then ``cycles`` cosine decays to 0, each restarting at 1."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))

    return factor


def sample_anchors(anchors: torch.Tensor, norms: torch.Tensor, config: CPEConfig, generator: torch.Generator) -> torch.Tensor:
    """B anchors: 2B cached ones, each plus noise of std ``anchor_noise``·‖a‖_F, mixed in pairs (λ ~ Beta(1, 1)).

    ``norms`` holds ‖a‖_F of every cached anchor. Mixing two noisy anchors gives
    λ a₁ + (1-λ) a₂ + n with n Gaussian of std sqrt((λσ₁)² + ((1-λ)σ₂)²); that is drawn directly
    (the same distribution, half the random numbers).
    """
    count, device = config.anchor_batch_size, anchors.device
    index = torch.randint(len(anchors), (2, count), generator=generator, device=device)
    first, sigma = anchors[index[0]], config.anchor_noise * norms[index[0]]
    if config.anchor_mixup:
        lam = torch.rand(count, generator=generator, device=device)  # Beta(1, 1) is uniform
        first = torch.lerp(anchors[index[1]], first, lam[:, None, None])
        sigma = torch.sqrt((lam * sigma) ** 2 + ((1 - lam) * config.anchor_noise * norms[index[1]]) ** 2)
    noise = torch.randn(first.shape, generator=generator, device=device)
    return first.add_(noise.mul_(sigma[:, None, None]))


class ConceptTrainer:
    """One concept's ResAG training (research notes, B2) as a state machine that can be saved between any two steps.

    ``targets`` and ``neutrals`` (P, T, d) are the templates filled with the concept and with the
    neutral word (row p of one matches row p of the other), ``anchors`` (N, T, d) the anchor cache
    (or None). The state: ``stage``, its ``phase`` ("erase", then "attack" after each stage but the
    last) and ``position`` (steps done in the phase); :meth:`step` does one optimiser step.
    """

    def __init__(self, bank: KVProjections, targets: torch.Tensor, neutrals: torch.Tensor, anchors: torch.Tensor | None,
                 config: CPEConfig):
        device = bank.gram.device
        self.bank, self.config, self.device = bank, config, device
        self.targets = targets.to(device, torch.float32)
        self.erase_x = (1 + config.guidance) * (neutrals.to(device, torch.float32) - self.targets)
        use_anchors = anchors is not None and len(anchors) > 0 and config.anchor_weight != 0
        self.anchors = anchors.to(device, torch.float32) if use_anchors else None
        self.anchor_norms = self.anchors.flatten(1).norm(dim=1) if use_anchors else None
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.resag = ResAG(bank.dim, bank.out_dims, config.rank, config.gate_rank, config.alpha, config.gate_key_projection,
                           torch.Generator().manual_seed(config.seed), device)
        self.attacks = config.adversarial_embeddings > 0 and config.adversarial_iterations > 0
        self.total = config.first_stage_iterations + (config.stages - 1) * (
            config.iterations + (config.adversarial_iterations if self.attacks else 0))
        self.steps = 0  # optimiser steps done
        self.history: list[dict] = []
        self.deltas = None  # the latest attack's δ, used by the erase steps after it
        self.attack_deltas = self.factors = None  # the attack in progress: its δ, the frozen ResAG's factors
        self.terms, self.attack_loss = {}, None  # the latest erase step's loss terms, the latest attack step's loss
        self._start_stage(0)
        self._advance()

    @property
    def done(self) -> bool:
        return self.stage >= self.config.stages

    def _length(self) -> int:
        config = self.config
        if self.phase == "attack":
            return config.adversarial_iterations
        return config.first_stage_iterations if self.stage == 0 else config.iterations

    def _start_stage(self, stage: int) -> None:
        self.stage, self.phase, self.position, self.record = stage, "erase", 0, {"stage": stage}
        if not self.done:
            self._erase_optimizer()

    def _erase_optimizer(self) -> None:
        config, first = self.config, self.stage == 0
        lr = config.first_stage_learning_rate if first else config.learning_rate
        self.optimizer = torch.optim.AdamW(self.resag.parameters(), lr=lr, weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_restarts(config.warmup_steps, self._length(), config.first_stage_cycles if first else 1))

    def _attack_optimizer(self, deltas: torch.Tensor) -> None:
        """The attack: N perturbations δ of the target states that bring W̃(e_t + δ) back to W e_t, ResAG frozen."""
        config = self.config
        self.attack_deltas = deltas.requires_grad_(True)
        self.optimizer = torch.optim.AdamW([self.attack_deltas], lr=config.adversarial_learning_rate,
                                           weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_restarts(config.adversarial_warmup_steps, config.adversarial_iterations, 1))
        self.resag.requires_grad_(False)
        self.factors = self.bank.factors(self.resag)

    def _advance(self) -> None:
        """Move past every finished phase (ones of no steps too); a new attack draws its initial δ ≈ 0 here."""
        config = self.config
        while not self.done and self.position >= self._length():
            if self.phase == "erase":
                self.record.update({k: float(v) for k, v in self.terms.items()} if self._length() else {})
                if self.attacks and self.stage < config.stages - 1:
                    count, tokens, dim = config.adversarial_embeddings, self.targets.shape[1], self.targets.shape[2]
                    bound = 1 / math.sqrt(dim) / dim**2  # ≈ 0: a uniform(±1/√d) init divided by d²
                    draw = torch.rand(count, tokens, dim, generator=self.generator, device=self.device)
                    self.phase, self.position = "attack", 0
                    self._attack_optimizer((draw * 2 - 1) * bound)
                    continue
            else:
                self.deltas, self.record["attack"] = self.attack_deltas.detach(), float(self.attack_loss)
                self.attack_deltas = self.factors = None
                self.resag.requires_grad_(True)
            self.history.append(self.record)
            self._start_stage(self.stage + 1)

    def step(self) -> None:
        """One optimiser step of the current phase (then on to the next phase if this one is done)."""
        if self.done:
            raise ErasekitError("this concept's training is finished")
        if self.phase == "erase":
            self._erase_step()
        else:
            self._attack_step()
        self.position += 1
        self.steps += 1
        self._advance()

    def _erase_step(self) -> None:
        config, bank, resag, deltas = self.config, self.bank, self.resag, self.deltas
        template = int(torch.randint(len(self.targets), (1,), generator=self.generator, device=self.device))
        inputs = [self.targets[template : template + 1]]
        x = [self.erase_x[template : template + 1]]
        if deltas is not None:
            inputs.append(self.targets[template : template + 1] + deltas)
            x.append(self.erase_x[template : template + 1] - deltas)
        if self.anchors is not None:
            inputs.append(sample_anchors(self.anchors, self.anchor_norms, config, self.generator))
        per_sample = bank.losses(resag.mixed(torch.cat(inputs)), resag.down, bank.factors(resag), x=torch.cat(x))
        terms = {"erase": per_sample[0]}
        loss = per_sample[0]
        if deltas is not None:
            terms["adversarial"] = per_sample[1 : 1 + len(deltas)].mean()
            loss = loss + config.adversarial_weight * terms["adversarial"]
        if self.anchors is not None:
            terms["anchor"] = per_sample[len(x[0]) + (0 if deltas is None else len(deltas)):].mean()
            loss = loss + config.anchor_weight * terms["anchor"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.terms = {k: v.detach() for k, v in terms.items()}

    def _attack_step(self) -> None:
        resag, deltas = self.resag, self.attack_deltas
        template = int(torch.randint(len(self.targets), (1,), generator=self.generator, device=self.device))
        z = resag.mixed(self.targets[template : template + 1] + deltas)
        loss = self.bank.losses(z, resag.down, self.factors, x=-deltas).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        self.attack_loss = loss.detach()

    def training_state(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON) of everything the rest of the training depends on (names start with ``prefix``)."""
        tensors = {f"{prefix}.resag.{name}": p for name, p in self.resag.named_parameters()}
        if self.deltas is not None:
            tensors[f"{prefix}.deltas"] = self.deltas
        if self.attack_deltas is not None:
            tensors[f"{prefix}.attack_deltas"] = self.attack_deltas
        optimizer_tensors, optimizer_values = optimizer_state(f"{prefix}.optimizer", self.optimizer)
        tensors.update(optimizer_tensors)
        state = {
            "stage": self.stage, "phase": self.phase, "position": self.position, "steps": self.steps,
            "generator": generator_state(self.generator), "optimizer": optimizer_values, "schedule": self.schedule.state_dict(),
            "history": self.history, "record": self.record, "terms": {k: float(v) for k, v in self.terms.items()},
            "attack_loss": None if self.attack_loss is None else float(self.attack_loss),
        }
        return tensors, state

    def load_state(self, prefix: str, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Continue from what :meth:`training_state` saved."""
        with torch.no_grad():
            for name, parameter in self.resag.named_parameters():
                parameter.copy_(tensors[f"{prefix}.resag.{name}"])
        self.deltas = tensors[f"{prefix}.deltas"].to(self.device) if f"{prefix}.deltas" in tensors else None
        self.stage, self.phase = int(state["stage"]), state["phase"]
        self.position, self.steps = int(state["position"]), int(state["steps"])
        self.history, self.record, self.terms = list(state["history"]), dict(state["record"]), dict(state["terms"])
        self.attack_loss = state["attack_loss"]
        set_generator_state(self.generator, state["generator"])
        if self.phase == "erase":
            self.attack_deltas = self.factors = None
            self.resag.requires_grad_(True)
            self._erase_optimizer()
        else:
            self._attack_optimizer(tensors[f"{prefix}.attack_deltas"].to(self.device, copy=True))
        load_optimizer_state(f"{prefix}.optimizer", self.optimizer, tensors, state["optimizer"])
        self.schedule.load_state_dict(dict(state["schedule"]))


def train_concept(bank: KVProjections, targets: torch.Tensor, neutrals: torch.Tensor, anchors: torch.Tensor | None,
                  config: CPEConfig, progress: bool = True, description: str = "cpe") -> tuple[ResAG, dict]:
    """Train one concept's ResAG from text states (see :class:`ConceptTrainer`); benchmarks pass random states."""
    trainer = ConceptTrainer(bank, targets, neutrals, anchors, config)
    with tqdm(total=trainer.total, desc=description, disable=not progress, leave=False) as bar:
        while not trainer.done:
            trainer.step()
            bar.update(1)
    return trainer.resag, {"stages": trainer.history}


# ----------------------------------------------------------------------------------- the text
def templates_for(target: EraseTarget, config: CPEConfig) -> list[str]:
    """The concept's prompt templates, each with one "{}"."""
    templates = read_list(config.templates, "templates") if config.templates is not None else list(target.templates)
    templates = list(dict.fromkeys(templates + list(config.extra_templates)))
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ErasekitError(f"every CPE template needs exactly one '{{}}' for the concept; fix: {bad[:3] or 'no templates'}")
    if 0 < config.max_templates < len(templates):
        keep = torch.randperm(len(templates), generator=torch.Generator().manual_seed(config.seed))[: config.max_templates]
        templates = [templates[i] for i in sorted(keep.tolist())]
    return templates


def encode_states(model, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """(prompts, tokens, dim) text states, encoded in batches, float32."""
    chunks = [model.encode(prompts[i : i + batch_size]).hidden_states.float() for i in range(0, len(prompts), batch_size)]
    return torch.cat(chunks)


def most_similar(model, concept: str, names: list[str], keep: int) -> list[str]:
    """The ``keep`` names whose bare text states are most cosine-similar to the concept's (all if keep <= 0)."""
    if keep <= 0 or len(names) <= keep:
        return names
    states = encode_states(model, [concept, *names]).flatten(1)
    similarity = torch.nn.functional.cosine_similarity(states[:1], states[1:])
    order = similarity.argsort(descending=True)[:keep]
    return [names[i] for i in order.tolist()]


def anchor_prompts(model, target: EraseTarget, templates: list[str], config: CPEConfig) -> list[str]:
    """The anchor prompts of one target (see the module docstring); names containing the concept are dropped."""
    lowered = target.concept.lower()

    def keep(names):
        return [n for n in names if lowered not in n.lower()]

    candidates = read_list(config.anchors_file, "anchors") if config.anchors_file is not None else target.anchor_candidates
    candidates = most_similar(model, target.concept, keep(candidates), config.similar_anchors)
    names = list(dict.fromkeys(keep(target.anchors) + keep(candidates) + list(target.preserve)))
    prompts = [t.format(n) for n in names for t in templates] if target.anchors_in_templates else names
    return list(dict.fromkeys(prompts + list(target.anchor_prompts)))


def _check(config: CPEConfig) -> None:
    positive = {k: getattr(config, k) for k in ("rank", "gate_rank", "stages", "anchor_batch_size")}
    bad = [k for k, v in positive.items() if v < 1]
    bad += [k for k in ("iterations", "first_stage_iterations", "adversarial_embeddings", "adversarial_iterations",
                        "warmup_steps", "adversarial_warmup_steps", "similar_anchors", "max_templates")
            if getattr(config, k) < 0]
    bad += [k for k in ("anchor_weight", "anchor_noise", "adversarial_weight", "learning_rate", "first_stage_learning_rate")
            if getattr(config, k) < 0]
    if bad:
        raise ErasekitError(f"CPE needs rank, gate_rank, stages, anchor_batch_size >= 1 and the rest >= 0; fix: {', '.join(bad)}")
    if config.checkpoint_dir is not None and config.checkpoint_every < 1:
        raise ErasekitError("checkpoint_every must be at least 1")


class CPETrainer:
    """A CPE run: each target's :class:`ConceptTrainer` in turn; with ``checkpoint_dir`` its whole state
    is saved every ``checkpoint_every`` steps (:mod:`erasekit.training`), and ``resume`` continues it.
    """

    def __init__(self, model, targets: list[EraseTarget], config: CPEConfig):
        self._started = self._concept_started = time.perf_counter()
        self.model, self.targets, self.config = model, list(targets), config
        self.bank = KVProjections.from_model(model)
        self.step = 0  # optimiser steps of the whole run
        self.states: list[dict[str, torch.Tensor]] = []  # the finished concepts' ResAG states
        self.info = {"projections": len(self.bank.names), "concepts": {}}
        self.current: ConceptTrainer | None = None  # the concept in training, targets[len(states)]
        self.current_info: dict = {}
        self.seconds = self.concept_seconds = 0.0  # of earlier sessions of the run / of the current concept

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self._started

    def checkpoint_key(self) -> dict:
        """Everything that determines the run: concepts and their text side, settings, K/V weights, erasures already applied."""
        text = [[t.concept, t.word, t.kind, t.neutral, t.templates, t.preserve, t.anchors, t.anchor_candidates, t.anchor_prompts,
                 t.anchors_in_templates] for t in self.targets]
        return {
            "method": "cpe", "concepts": [t.concept for t in self.targets],
            "text": hashlib.sha256(json.dumps(text).encode()).hexdigest()[:16],
            "config": comparable(dataclasses.asdict(self.config), RESUMABLE_CHANGES),
            "base": weights_digest(dict(zip(self.bank.names, self.bank.weights))),
            "on_top_of": [(e.digest, scale) for e, scale in self.model.applied_erasures],
        }

    def _start_concept(self) -> None:
        """Encode the next target's text side and set up its trainer."""
        self._concept_started, self.concept_seconds = time.perf_counter(), 0.0
        target, config, model = self.targets[len(self.states)], self.config, self.model
        templates = templates_for(target, config)
        concept_states = encode_states(model, [t.format(target.word) for t in templates])
        neutrals = encode_states(model, [t.format(target.neutral) for t in templates])
        prompts = anchor_prompts(model, target, templates, config)
        anchors = encode_states(model, prompts) if prompts else None
        self.current = ConceptTrainer(self.bank, concept_states, neutrals, anchors, config)
        self.current_info = {"kind": target.kind, "neutral": target.neutral, "templates": len(templates), "anchors": len(prompts)}

    def _finish_concept(self) -> None:
        seconds = self.concept_seconds + time.perf_counter() - self._concept_started
        self.states.append(self.current.resag.state(self.bank.names))
        self.info["concepts"][self.targets[len(self.states) - 1].concept] = {
            **self.current_info, "seconds": round(seconds, 2), "stages": self.current.history}
        self.current = None

    def train(self, progress: bool = True) -> None:
        """Run (or continue from the newest checkpoint) to the end."""
        config = self.config
        checkpoints, saved = resume_or_start(config, "cpe", self.checkpoint_key())
        if saved is not None:
            self.load_state(*saved)
        while len(self.states) < len(self.targets):
            index = len(self.states)
            if self.current is None:
                self._start_concept()
            trainer = self.current
            description = f"cpe {self.targets[index].concept!r} ({index + 1}/{len(self.targets)})"
            with tqdm(total=trainer.total, initial=trainer.steps, desc=description, disable=not progress, leave=False) as bar:
                while not trainer.done:
                    trainer.step()
                    self.step += 1
                    bar.update(1)
                    if trainer.done:
                        self._finish_concept()
                    if checkpoints is not None and self.step % config.checkpoint_every == 0:
                        checkpoints.save(self.step, *self.training_state())
            if self.current is trainer:  # a concept of no steps at all
                self._finish_concept()

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON) between two steps: the finished concepts' ResAGs and info, the current concept's state."""
        tensors = {f"done.{i}.{name}": value.clone() for i, state in enumerate(self.states) for name, value in state.items()}
        state = {"step": self.step, "finished": len(self.states), "names": list(self.states[0]) if self.states else [],
                 "info": self.info, "seconds": self.elapsed(), "concept": None}
        if self.current is not None:
            concept_tensors, concept_state = self.current.training_state("concept")
            tensors.update(concept_tensors)
            seconds = self.concept_seconds + time.perf_counter() - self._concept_started
            state["concept"] = {**concept_state, "info": self.current_info, "seconds": seconds}
        return tensors, state

    def load_state(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.step, self.info = int(state["step"]), state["info"]
        self.states = [{name: tensors[f"done.{i}.{name}"] for name in state["names"]} for i in range(int(state["finished"]))]
        self.seconds, self._started = float(state["seconds"]), time.perf_counter()
        self.current = None
        if state["concept"] is not None:
            self._start_concept()
            self.current.load_state("concept", tensors, state["concept"])
            self.current_info, self.concept_seconds = state["concept"]["info"], float(state["concept"]["seconds"])


def erase(model, targets: list[EraseTarget], config: CPEConfig | None = None, progress: bool = True) -> Erasure:
    """Erase the targets with CPE: one ResAG per concept, trained on its own, stacked in one Erasure (resumable)."""
    config = config or CPEConfig()
    _check(config)
    require(targets, "kind", "cpe")
    trainer = CPETrainer(model, targets, config)
    trainer.train(progress)
    trainer.info["seconds"] = round(trainer.elapsed(), 2)
    return build_erasure(model, [t.concept for t in trainer.targets], trainer.states, config, trainer.info)


def build_erasure(model, concepts: list[str], states: list[dict[str, torch.Tensor]], config: CPEConfig, info=None) -> Erasure:
    """The Erasure of trained ResAGs: each concept's :meth:`ResAG.state`, stacked on a leading concept axis."""
    if len(states) != len(concepts) or not states:
        raise ErasekitError("give one ResAG state per concept")
    modules = {name: torch.stack([s[name] for s in states]) for name in states[0]}
    kv_weights = [f"{name}.weight" for name in model.key_value_projections()]
    return Erasure(
        method="cpe", concepts=list(concepts), base_model=model.name, config=dataclasses.asdict(config), modules=modules,
        module_type="cpe", base_signature=model_signature(model, kv_weights), info=dict(info or {}),
    )
