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
its own low-rank pair D_ℓ (d x r, uniform(±1/√d) like a LoRA down matrix) and U_ℓ (r x out_ℓ,
zero). s_c starts at zero (every gate at 0.5), A_c at ~1e-8 (S uniform) and U_ℓ at zero, so a
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
cycle); AdamW throughout (the paper's 8-bit AdamW is a memory saving, not part of the method).
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

**Anchors and templates** come from the ``domain`` (``auto``: ``toy`` on the toy model, else
``celebrity``), or from the fields that override it:

* celebrity: neutral "a person", ``data/templates_person.txt``, candidates ``data/anchors_people.txt``,
  always kept ``data/anchors_person_words.txt``;
* artist: neutral "real photograph", ``data/templates_art.txt``, candidates ``data/anchors_artists.txt``,
  always kept ``data/anchors_art_words.txt``;
* explicit: neutral "a person in modest clothing", ``data/templates_explicit.txt``, the everyday
  sentences of ``data/anchors_sentences.txt`` (all kept, used as written);
* toy: neutral "object" for a shape ("plain" for a style, "colored" for a colour), the toy's
  training captions with the concept's slot open, the other shapes' (styles', colours') names.

Anchor names go into every template (explicit sentences are used as they are); ``preserve``
adds names that are always kept. Of ``anchors_file`` the ``similar_anchors`` entries whose
bare-name text states are most cosine-similar to the concept's are kept; names containing the
concept are dropped. On the toy model the anchors are the other shapes' names in every toy
caption template (so every colour and style is anchored in context) plus the bare colour and
style words. The bundled lists are small ones written for erasekit, not the paper's
500-celebrity and 1,734-artist lists; pass ``anchors_file`` to use longer ones.

Presets: ``paper`` and ``celebrity`` (the defaults: r = 1, r_g = 16, g = 0.3, λ = 1e5, 5 stages),
``artist`` (g = 0.5, λ = 1e4, 10 stages, 16 anchors), ``explicit`` (r = 4, r_g = 64, g = 3,
λ = 1e4, 20 stages of 1,200 iterations, 32 perturbations), ``toy`` (g = 3, λ = 1e3, 3 short stages at
10x the learning rates, 8 perturbations, 24 templates: one shape in ~15 s on one CPU core).

On disk (``module.<name>`` tensors of the :class:`~erasekit.Erasure`, leading axis = concept):
``gate.query`` (C, d, r_g), ``gate.scaler`` (C, d), ``gate.key`` (C, d, r_g; only with
``gate_key_projection``), ``alpha`` (C,), and per projection ``<attn path>.to_k.down`` (C, d, r),
``<attn path>.to_k.up`` (C, r, out), likewise ``.to_v``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erasekit.erasure import Erasure, model_signature, register_module_erasure
from erasekit.errors import ErasekitError
from erasekit.models.attention import HookedCrossAttnProcessor, hooked_processor, remove_hooks

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
HOOK_NAME = "cpe"
QUERY_INIT = 1e-8  # |A| at initialisation (research notes, B1.7)

# The text side of each domain (research notes, B2); "toy" lists are built from erasekit.toy.world.
DOMAINS = {
    "celebrity": dict(neutral="a person", templates="person", anchors_file="people",
                      generic_anchors_file="person_words", anchors_in_templates=True),
    "artist": dict(neutral="real photograph", templates="art", anchors_file="artists",
                   generic_anchors_file="art_words", anchors_in_templates=True),
    "explicit": dict(neutral="a person in modest clothing", templates="explicit", anchors_file="sentences",
                     generic_anchors_file="", anchors_in_templates=False),
    "toy": dict(neutral=None, templates="toy", anchors_file="toy", generic_anchors_file="", anchors_in_templates=True),
}


@dataclass
class CPEConfig:
    """CPE settings; the defaults are the paper code's celebrity settings (research notes, B3)."""

    domain: str = "auto"  # celebrity, artist, explicit or toy (text-side defaults); auto: toy on the toy model, else celebrity
    neutral: str | None = None  # e_n's word; None: the domain's
    templates: str | None = None  # prompt templates with "{}": a bundled list (person, art, explicit, toy) or a file
    anchors_file: str | None = None  # candidate anchors (bundled: people, artists, sentences, toy; or a file); "" for none
    generic_anchors_file: str | None = None  # anchors always kept (bundled: person_words, art_words; or a file); "" for none
    anchors_in_templates: bool | None = None  # put each anchor name in every template (None: the domain's)
    similar_anchors: int = 50  # keep this many of anchors_file, the most similar to the concept (0: all)
    max_templates: int = 0  # use at most this many templates, a seeded random subset (0: all, the paper)
    rank: int = 1  # r of each projection's D U
    gate_rank: int = 16  # r_g of the gate's query projection A
    alpha: float = 1.0  # α (the residual is scaled by α/r)
    guidance: float = 0.3  # g: target W e_n + g (W e_n - W e_t)
    anchor_weight: float = 1e5  # λ_anc ("pal")
    anchor_batch_size: int = 32  # B anchors per step (2B cached anchors drawn, then mixed in pairs)
    anchor_noise: float = 1e-3  # std of the anchors' noise, relative to ‖a‖_F
    anchor_mixup: bool = True  # mix the 2B noisy anchors in pairs, λ ~ Beta(1, 1)
    stages: int = 5  # erase stages (each but the last followed by an attack)
    iterations: int = 450  # erase iterations per stage from stage 1 on
    first_stage_iterations: int = 1800  # erase iterations of stage 0
    learning_rate: float = 3e-5  # AdamW, stages 1..
    first_stage_learning_rate: float = 3e-4  # AdamW, stage 0
    first_stage_cycles: int = 2  # hard restarts of stage 0's cosine schedule
    warmup_steps: int = 5  # linear warm-up of every schedule
    weight_decay: float = 0.01  # AdamW's
    adversarial_embeddings: int = 16  # N perturbations δ per attack (0: no adversarial training)
    adversarial_iterations: int = 450  # attack iterations
    adversarial_learning_rate: float = 1e-2
    adversarial_weight: float = 1.0  # weight of the adversarial erase term ("adv_coef")
    gate_key_projection: bool = False  # the gate uses Q (E A_key)ᵀ, the code's intent, instead of Q Qᵀ (released behaviour)
    seed: int = 2024
    extra_templates: list[str] = field(default_factory=list)  # more templates with "{}", added to the domain's


CONFIG = CPEConfig

PRESETS = {
    "paper": {},
    "celebrity": {"domain": "celebrity"},
    "artist": {"domain": "artist", "guidance": 0.5, "anchor_weight": 1e4, "stages": 10, "anchor_batch_size": 16},
    "explicit": {
        "domain": "explicit", "rank": 4, "gate_rank": 64, "guidance": 3.0, "anchor_weight": 1e4, "stages": 20,
        "iterations": 1200, "first_stage_iterations": 2400, "adversarial_iterations": 1200, "adversarial_embeddings": 32,
        "anchor_batch_size": 16, "warmup_steps": 10, "similar_anchors": 0,
    },
    # Tuned on the bundled toy model: one shape in about 15 s on one CPU core (text encoding included).
    "toy": {
        "domain": "toy", "guidance": 3.0, "anchor_weight": 1e3, "stages": 3, "first_stage_iterations": 600,
        "iterations": 200, "first_stage_learning_rate": 3e-3, "learning_rate": 3e-4, "adversarial_embeddings": 8,
        "adversarial_iterations": 100, "anchor_batch_size": 16, "max_templates": 24,
    },
}


# ---------------------------------------------------------------------------------- the ResAG
class ResAG(torch.nn.Module):
    """One concept's residual attention gates on L projections (research notes, B1).

    ``query`` A (d, r_g), ``scaler`` s (d,) and the optional ``key`` are the gate network shared
    by all projections; ``down[ℓ]`` D_ℓ (d, r) and ``up[ℓ]`` U_ℓ (r, out_ℓ) are projection ℓ's.
    """

    def __init__(self, dim: int, out_dims: list[int], rank: int = 1, gate_rank: int = 16, alpha: float = 1.0,
                 key_projection: bool = False, generator: torch.Generator | None = None, device=None):
        super().__init__()

        def uniform(shape, bound):
            return (torch.rand(shape, generator=generator) * 2 - 1).mul_(bound).to(device)

        self.rank, self.alpha = rank, alpha
        self.query = torch.nn.Parameter(uniform((dim, gate_rank), QUERY_INIT))
        self.key = torch.nn.Parameter(uniform((dim, gate_rank), QUERY_INIT)) if key_projection else None
        self.scaler = torch.nn.Parameter(torch.zeros(dim, device=device))
        self.down = torch.nn.Parameter(uniform((len(out_dims), dim, rank), 1 / math.sqrt(dim)))
        self.up = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(rank, out, device=device)) for out in out_dims])

    def gate(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, Ē) for text states (B, T, d): g (B, T) in (0, 1), Ē = softmax(Q Kᵀ) E (B, T, d)."""
        return gate_outputs(states, self.query, self.scaler, self.key)

    def mixed(self, states: torch.Tensor) -> torch.Tensor:
        """z = (α/r) · g · Ē (B, T, d): ResAG_ℓ(E) = z D_ℓ U_ℓ."""
        g, mixed = self.gate(states)
        return (self.alpha / self.rank) * g[..., None] * mixed

    def residual(self, states: torch.Tensor, index: int) -> torch.Tensor:
        """ResAG_ℓ(E) (B, T, out_ℓ) of projection ``index``, computed directly."""
        return self.mixed(states) @ self.down[index] @ self.up[index]

    def state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors this concept contributes to an erasure (float32, CPU, no concept axis yet)."""
        tensors = {"gate.query": self.query, "gate.scaler": self.scaler, "alpha": torch.tensor(float(self.alpha))}
        if self.key is not None:
            tensors["gate.key"] = self.key
        for index, name in enumerate(names):
            tensors[f"{name}.down"] = self.down[index]
            tensors[f"{name}.up"] = self.up[index]
        return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def gate_outputs(states: torch.Tensor, query: torch.Tensor, scaler: torch.Tensor, key: torch.Tensor | None = None):
    """The gate for text states (B, T, d) and one concept (query (d, r_g)) or several (query (C, d, r_g)).

    Returns g (…, B, T) and Ē (…, B, T, d), with a leading concept axis when ``query`` has one.
    """
    stacked = query.ndim == 3
    q = torch.einsum("btd,cdr->cbtr", states, query) if stacked else states @ query
    k = q if key is None else (torch.einsum("btd,cdr->cbtr", states, key) if stacked else states @ key)
    attention = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    mixed = attention @ states  # (…, B, T, T) @ (B, T, d)
    g = torch.sigmoid((mixed * (scaler[:, None, None, :] if stacked else scaler)).sum(-1))
    return g, mixed


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


def attack(bank: KVProjections, resag: ResAG, targets: torch.Tensor, config: CPEConfig, generator: torch.Generator,
           progress_bar=None) -> tuple[torch.Tensor, float]:
    """N perturbations δ of the target states that bring W̃(e_t + δ) back to W e_t (ResAG frozen); returns (δ, last loss)."""
    count, tokens, dim = config.adversarial_embeddings, targets.shape[1], targets.shape[2]
    bound = 1 / math.sqrt(dim) / dim**2  # ≈ 0: a uniform(±1/√d) init divided by d²
    deltas = ((torch.rand(count, tokens, dim, generator=generator, device=targets.device) * 2 - 1) * bound).requires_grad_(True)
    optimizer = torch.optim.AdamW([deltas], lr=config.adversarial_learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_restarts(config.warmup_steps, config.adversarial_iterations, 1))
    resag.requires_grad_(False)
    try:
        factors = bank.factors(resag)
        loss = torch.zeros(())
        for _ in range(config.adversarial_iterations):
            template = int(torch.randint(len(targets), (1,), generator=generator, device=targets.device))
            z = resag.mixed(targets[template : template + 1] + deltas)
            loss = bank.losses(z, resag.down, factors, x=-deltas).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress_bar is not None:
                progress_bar.update(1)
    finally:
        resag.requires_grad_(True)
    return deltas.detach(), float(loss.detach())


def train_concept(bank: KVProjections, targets: torch.Tensor, neutrals: torch.Tensor, anchors: torch.Tensor | None,
                  config: CPEConfig, progress: bool = True, description: str = "cpe") -> tuple[ResAG, dict]:
    """Train one concept's ResAG (research notes, B2) from text states.

    ``targets`` and ``neutrals`` (P, T, d) are the templates filled with the concept and with the
    neutral word (row p of one matches row p of the other), ``anchors`` (N, T, d) the anchor cache
    (or None). No text encoder is needed: benchmarks pass random states.
    """
    device = bank.gram.device
    targets, neutrals = targets.to(device, torch.float32), neutrals.to(device, torch.float32)
    anchors = None if anchors is None or len(anchors) == 0 or config.anchor_weight == 0 else anchors.to(device, torch.float32)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    init_generator = torch.Generator().manual_seed(config.seed)
    resag = ResAG(bank.dim, bank.out_dims, config.rank, config.gate_rank, config.alpha, config.gate_key_projection,
                  init_generator, device)
    erase_x = (1 + config.guidance) * (neutrals - targets)
    anchor_norms = None if anchors is None else anchors.flatten(1).norm(dim=1)
    attacks = config.adversarial_embeddings > 0 and config.adversarial_iterations > 0
    total = config.first_stage_iterations + (config.stages - 1) * config.iterations
    total += (config.stages - 1) * config.adversarial_iterations if attacks else 0
    history = []
    deltas = None
    bar = tqdm(total=total, desc=description, disable=not progress, leave=False)
    for stage in range(config.stages):
        first = stage == 0
        iterations = config.first_stage_iterations if first else config.iterations
        optimizer = torch.optim.AdamW(resag.parameters(), lr=config.first_stage_learning_rate if first else config.learning_rate,
                                      weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_with_restarts(config.warmup_steps, iterations, config.first_stage_cycles if first else 1))
        record = {"stage": stage}
        for _ in range(iterations):
            template = int(torch.randint(len(targets), (1,), generator=generator, device=device))
            inputs = [targets[template : template + 1]]
            x = [erase_x[template : template + 1]]
            if deltas is not None:
                inputs.append(targets[template : template + 1] + deltas)
                x.append(erase_x[template : template + 1] - deltas)
            if anchors is not None:
                inputs.append(sample_anchors(anchors, anchor_norms, config, generator))
            per_sample = bank.losses(resag.mixed(torch.cat(inputs)), resag.down, bank.factors(resag), x=torch.cat(x))
            terms = {"erase": per_sample[0]}
            loss = per_sample[0]
            if deltas is not None:
                terms["adversarial"] = per_sample[1 : 1 + len(deltas)].mean()
                loss = loss + config.adversarial_weight * terms["adversarial"]
            if anchors is not None:
                terms["anchor"] = per_sample[len(x[0]) + (0 if deltas is None else len(deltas)):].mean()
                loss = loss + config.anchor_weight * terms["anchor"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
        record.update({k: float(v.detach()) for k, v in terms.items()} if iterations else {})
        if attacks and stage < config.stages - 1:
            deltas, record["attack"] = attack(bank, resag, targets, config, generator, bar)
        history.append(record)
    bar.close()
    return resag, {"stages": history}


# ----------------------------------------------------------------------------------- the text
def resolve_domain(model, config: CPEConfig) -> dict:
    """The domain's text-side settings, with the config's own values where it sets them."""
    domain = config.domain
    if domain == "auto":
        domain = "toy" if getattr(model, "kind", None) == "toy" else "celebrity"
    if domain not in DOMAINS:
        raise ErasekitError(f"unknown CPE domain {config.domain!r}; choose one of: auto, {', '.join(DOMAINS)}")
    settings = dict(DOMAINS[domain], domain=domain)
    for key in ("neutral", "templates", "anchors_file", "generic_anchors_file", "anchors_in_templates"):
        if getattr(config, key) is not None:
            settings[key] = getattr(config, key)
    return settings


def read_list(name: str, kind: str) -> list[str]:
    """A bundled list (``data/<kind>_<name>.txt``) or a text file: one entry a line, # starts a comment."""
    if not name:
        return []
    path = Path(name).expanduser()
    if not path.is_file():
        path = DATA_DIR / f"{kind}_{name}.txt"
        if not path.is_file():
            bundled = sorted(p.stem[len(kind) + 1:] for p in DATA_DIR.glob(f"{kind}_*.txt"))
            raise ErasekitError(f"{name!r} is neither a file nor a bundled CPE {kind} list ({', '.join(bundled)})")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def toy_kind(concept: str) -> str:
    """Which toy attribute a word names: "style" (a style's key, adjective or noun), "color", else "shape"."""
    from erasekit.toy import world

    if any(concept == key or concept in words for key, words in world.STYLE_WORDS.items()):
        return "style"
    return "color" if concept in world.COLOR_NAMES else "shape"


def toy_templates(concept: str) -> list[str]:
    """Every toy training caption with the concept's attribute left open ("{}") and the others filled in.

    For a shape: 124 templates covering each colour and style; for a colour 114, for a style 78
    (the captions that name the style by its adjective).
    """
    from erasekit.toy import world

    slot = {"shape": "s", "color": "c", "style": "a"}[toy_kind(concept)]
    captions = [*world.TRAIN_TEMPLATES_FULL, *world.TRAIN_TEMPLATES_NO_STYLE, *world.TRAIN_TEMPLATES_NO_COLOR,
                *world.TRAIN_TEMPLATES_SHAPE_ONLY]
    shapes = ["{}"] if slot == "s" else [words[0] for words in world.SHAPE_NAMES.values()]
    colours = ["{}"] if slot == "c" else world.COLOR_NAMES
    styles = [("{}", None)] if slot == "a" else list(world.STYLE_WORDS.values())
    templates = []
    for caption in captions:
        if "{" + slot + "}" not in caption or (slot == "a" and "{n}" in caption):
            continue
        for shape in shapes if "{s}" in caption else [None]:
            for colour in colours if "{c}" in caption else [None]:
                for adjective, noun in styles if ("{a}" in caption or "{n}" in caption) else [(None, None)]:
                    templates.append(caption.format(s=shape, c=colour, a=adjective, n=noun))
    return list(dict.fromkeys(templates))


def toy_anchors(concept: str) -> tuple[list[str], list[str]]:
    """The toy's anchors: (the other names of the concept's attribute, for the templates; the other attributes' bare words)."""
    from erasekit.toy import world

    kind = toy_kind(concept)
    shapes = [n for words in world.SHAPE_NAMES.values() if concept not in words for n in words]
    colours = [c for c in world.COLOR_NAMES if c != concept]
    styles = [w for key, pair in world.STYLE_WORDS.items() if concept != key and concept not in pair
              for w in pair if w != "nothing"]
    adjectives = [pair[0] for key, pair in world.STYLE_WORDS.items() if concept != key and concept not in pair]
    if kind == "shape":
        return shapes, colours + styles
    if kind == "color":
        return colours, list(world.SHAPES) + styles
    return adjectives, list(world.SHAPES) + colours


def toy_neutral(concept: str) -> str:
    """The neutral word for a toy concept: "object" for shapes, "plain" for styles, "colored" for colours.

    Not "shape": the toy model draws mostly triangles for it ("three-sided shape" is a triangle's name).
    """
    return {"shape": "object", "color": "colored", "style": "plain"}[toy_kind(concept)]


def templates_for(settings: dict, config: CPEConfig, concept: str) -> list[str]:
    """The concept's prompt templates, each with one "{}"."""
    templates = toy_templates(concept) if settings["templates"] == "toy" else read_list(settings["templates"], "templates")
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


def anchor_prompts(model, concept: str, preserve: list[str], settings: dict, templates: list[str],
                   config: CPEConfig) -> list[str]:
    """The anchor prompts of one concept (see the module docstring); names containing the concept are dropped."""
    lowered = concept.lower()

    def keep(names):
        return [n for n in names if lowered not in n.lower()]

    extra = []
    if settings["anchors_file"] == "toy":
        candidates, extra = toy_anchors(concept)
    else:
        candidates = most_similar(model, concept, keep(read_list(settings["anchors_file"], "anchors")), config.similar_anchors)
    names = list(dict.fromkeys(keep(read_list(settings["generic_anchors_file"], "anchors")) + keep(candidates) + list(preserve)))
    prompts = [t.format(n) for n in names for t in templates] if settings["anchors_in_templates"] else names
    return list(dict.fromkeys(prompts + extra))


# ---------------------------------------------------------------------------------- the method
def _check(config: CPEConfig) -> None:
    positive = {k: getattr(config, k) for k in ("rank", "gate_rank", "stages", "anchor_batch_size")}
    bad = [k for k, v in positive.items() if v < 1]
    bad += [k for k in ("iterations", "first_stage_iterations", "adversarial_embeddings", "adversarial_iterations",
                        "warmup_steps", "similar_anchors", "max_templates") if getattr(config, k) < 0]
    bad += [k for k in ("anchor_weight", "anchor_noise", "adversarial_weight", "learning_rate", "first_stage_learning_rate")
            if getattr(config, k) < 0]
    if bad:
        raise ErasekitError(f"CPE needs rank, gate_rank, stages, anchor_batch_size >= 1 and the rest >= 0; fix: {', '.join(bad)}")


def erase(model, concepts, preserve=(), config: CPEConfig | None = None, progress: bool = True) -> Erasure:
    """Erase ``concepts`` with CPE: one ResAG per concept, trained on its own, stacked in one Erasure."""
    config = config or CPEConfig()
    _check(config)
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    started = time.perf_counter()
    settings = resolve_domain(model, config)
    bank = KVProjections.from_model(model)
    states, info = [], {"domain": settings["domain"], "projections": len(bank.names), "concepts": {}}
    for index, concept in enumerate(concepts):
        concept_started = time.perf_counter()
        templates = templates_for(settings, config, concept)
        neutral = settings["neutral"] if settings["neutral"] is not None else toy_neutral(concept)
        targets = encode_states(model, [t.format(concept) for t in templates])
        neutrals = encode_states(model, [t.format(neutral) for t in templates])
        prompts = anchor_prompts(model, concept, list(preserve), settings, templates, config)
        anchors = encode_states(model, prompts) if prompts else None
        resag, history = train_concept(bank, targets, neutrals, anchors, config, progress,
                                       description=f"cpe {concept!r} ({index + 1}/{len(concepts)})")
        states.append(resag.state(bank.names))
        info["concepts"][concept] = {
            "neutral": neutral, "templates": len(templates), "anchors": len(prompts),
            "seconds": round(time.perf_counter() - concept_started, 2), **history,
        }
    info["seconds"] = round(time.perf_counter() - started, 2)
    return build_erasure(model, concepts, states, config, info)


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


# ------------------------------------------------------------------------------- at inference
class _Attached:
    """One applied CPE erasure's tensors, on the model's device in float32, ready for routing."""

    def __init__(self, erasure: Erasure, scale: float, device):
        self.erasure, self.scale = erasure, scale
        self.to(device)

    def to(self, device) -> None:
        """(Re)load the tensors onto ``device`` (the model may have moved since the erasure was applied)."""
        tensors = {k: v.to(device, torch.float32) for k, v in self.erasure.modules.items()}
        self.device = torch.device(device)
        self.query, self.scaler, self.key = tensors["gate.query"], tensors["gate.scaler"], tensors.get("gate.key")
        rank = next(v for k, v in tensors.items() if k.endswith(".down")).shape[-1]
        self.coefficient = tensors["alpha"] / rank * self.scale  # (C,)
        names = [k[: -len(".down")] for k in tensors if k.endswith(".down")]
        self.pairs = {name: (tensors[f"{name}.down"], tensors[f"{name}.up"]) for name in names}

    def residual(self, name: str, z: torch.Tensor) -> torch.Tensor:
        """Σ_c z_c D_c U_c (B, T, out) for projection ``name``; z (C, B, T, d) is zero where c is not routed."""
        down, up = self.pairs[name]
        return torch.einsum("cbtr,cro->bto", torch.einsum("cbtd,cdr->cbtr", z, down), up)


class _Router:
    """Every CPE erasure applied to one model; routes each token to the concept with the top gate."""

    def __init__(self):
        self.entries: list[_Attached] = []
        self._cache = None  # (text states, their key, routed z per entry)

    def clear_cache(self) -> None:
        self._cache = None

    @staticmethod
    def _key(states: torch.Tensor):
        try:
            version = states._version
        except RuntimeError:  # inference tensors have no version counter: do not cache
            return None
        return (states.data_ptr(), tuple(states.shape), states.stride(), states.dtype, states.device, version,
                torch.is_grad_enabled())

    def routed(self, states: torch.Tensor) -> list[torch.Tensor]:
        """Per entry z (C, B, T, d) = (α/r)·scale·g·Ē on the tokens its concepts win, zero elsewhere."""
        key = self._key(states)
        if key is not None and self._cache is not None and self._cache[1] == key:
            return self._cache[2]
        text = states.float()
        for entry in self.entries:
            if entry.device != text.device:
                entry.to(text.device)
        gates, mixes = zip(*(gate_outputs(text, e.query, e.scaler, e.key) for e in self.entries))
        all_gates = torch.cat(gates)  # (C_total, B, T)
        winner = torch.nn.functional.one_hot(all_gates.argmax(0), all_gates.shape[0]).permute(2, 0, 1).to(text.dtype)
        routed, start = [], 0
        for entry, g, mixed in zip(self.entries, gates, mixes):
            count = g.shape[0]
            weight = winner[start : start + count] * g * entry.coefficient[:, None, None]
            routed.append(weight[..., None] * mixed)
            start += count
        self._cache = None if key is None else (states, key, routed)
        return routed


class _LayerHook:
    """The kv hook of one cross-attention layer: key/value plus the routed residuals."""

    def __init__(self, router: _Router, path: str):
        self.router, self.key_name, self.value_name = router, f"{path}.to_k", f"{path}.to_v"

    def __call__(self, attn, text_states, key, value):
        for entry, z in zip(self.router.entries, self.router.routed(text_states)):
            key = key + entry.residual(self.key_name, z).to(key.dtype)
            value = value + entry.residual(self.value_name, z).to(value.dtype)
        return key, value


def _router(layers: dict[str, torch.nn.Module]) -> _Router | None:
    for attn in layers.values():
        processor = attn.processor
        if isinstance(processor, HookedCrossAttnProcessor) and HOOK_NAME in processor.kv_hooks:
            return processor.kv_hooks[HOOK_NAME].router
    return None


@register_module_erasure("cpe")
class CPEModules:
    """Attaches and detaches CPE erasures (``Erasure.apply`` / ``remove`` call these)."""

    @staticmethod
    def attach(model, erasure: Erasure, scale: float = 1.0) -> None:
        layers = model.cross_attention_layers()
        entry = _Attached(erasure, scale, model.device)
        for path, attn in layers.items():
            for which, linear in (("to_k", attn.to_k), ("to_v", attn.to_v)):
                pair = entry.pairs.get(f"{path}.{which}")
                if pair is None or pair[0].shape[1] != linear.in_features or pair[1].shape[2] != linear.out_features:
                    raise ErasekitError(
                        f"this CPE erasure has no gate fitting {path}.{which}; it was made for another architecture")
        if len(entry.pairs) != 2 * len(layers):
            raise ErasekitError(
                "this CPE erasure has gates for layers the model does not have; it was made for another architecture")
        router = _router(layers)
        if router is None:
            router = _Router()
            for path, attn in layers.items():
                hooked_processor(attn).kv_hooks[HOOK_NAME] = _LayerHook(router, path)
        router.entries.append(entry)
        router.clear_cache()

    @staticmethod
    def detach(model, erasure: Erasure) -> None:
        layers = model.cross_attention_layers()
        router = _router(layers)
        if router is None:
            return
        router.entries = [e for e in router.entries if e.erasure is not erasure]
        router.clear_cache()
        if not router.entries:
            remove_hooks(layers, HOOK_NAME)
