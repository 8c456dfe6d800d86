"""RECE: Reliable and Efficient Concept Erasure (Gong et al., ECCV 2024).

RECE starts from a legacy-UCE edit and then, for ``epochs`` rounds, finds the text
embedding that still makes the edited model produce the concept and erases that too.
Every step is closed-form (research notes, section 3.1):

Step 0, UCE
    :mod:`erasekit.methods.uce` in ``"legacy"`` token mode from the original weights W⁰,
    with RECE's guide, "" preserved, λ = ``uce_lamb`` (0.5), s_p = ``uce_preserve_scale``.

Step 1, the adversarial embedding (``close_regzero``)
    For every token row c of the concept prompt's full embedding, with W'_l the current and
    W⁰_l the original to_k and to_v of every cross-attention layer::

        c' = (λ I + Σ_l W'_lᵀ W'_l)⁻¹ (Σ_l W'_lᵀ W⁰_l) c

    the minimiser of Σ_l ||W'_l c' - W⁰_l c||² + λ ||c'||², λ = ``regular_scale``: an
    embedding for which the edited model emits the original model's keys and values of the
    concept. See :func:`closed_form_adversarial_embedding`, which any attack can call.

Step 2, erase c'
    The UCE closed form with the current weights W as the anchor::

        W ← (λ₂ W + s_e Σ (W g) c'ᵀ + λ₁ Σ (W p) pᵀ)(λ₂ I + s_e Σ c' c'ᵀ + λ₁ Σ p pᵀ)⁻¹

    over all rows: row k of c' maps to row k of the guide prompt's embedding g, and p runs
    over every row of the retain prompts: ``retain`` once per concept, as the official train.py's
    ``[' '] * len(concepts)`` (``retain_per_concept``; once with it off), then the targets' preserved
    prompts once each. λ₂ = ``lamb``, λ₁ = ``preserve_scale``,
    s_e = ``erase_scale``. With ``keep_concept_erased`` (erasekit's, not the paper's) the
    concept's own rows join the retain rows, so each round keeps them at the outputs the UCE
    step gave them.

With ``validate`` (a callable scoring a model, lower is better) each round's result is
applied to the model, scored and taken off again, and the best round is kept; otherwise
the last round is. The result is one :class:`~erasekit.Erasure` of deltas from the
original weights, holding the UCE edit and every round up to the kept one.

How it is computed: every UCE-style step multiplies every matrix on the right by the same
d x d matrix T (see :mod:`erasekit.methods.uce`), so after the UCE edit and k rounds
W'_l = W⁰_l S with S = T_uce T_1 ... T_k. The sums of step 1 are then
Σ W'ᵀW' = Sᵀ H⁰ S and Σ W'ᵀW⁰ = Sᵀ H⁰ with H⁰ = Σ_l W⁰_lᵀ W⁰_l, computed once; a round
costs a few d x d products, and the deltas W⁰_l (S - I) are formed at the end (and after
every round when validating). All of it is float64.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from erasekit.erasure import Erasure
from erasekit.errors import ErasekitError
from erasekit.methods.uce import (
    UCEConfig, encode_guides, float64_device, key_value_weights, uce_edit, uce_solve,
)
from erasekit.models.handle import Conditioning
from erasekit.targets import EraseTarget, require


def _help(text: str, **checks) -> dict:
    return {"help": text, **checks}


@dataclass
class RECEConfig:
    """RECE settings; the defaults are the paper's nudity settings (research notes, section 3.2)."""

    epochs: int = field(default=3, metadata=_help("Rounds of (adversarial embedding, erase it).", min=0))
    regular_scale: float = field(default=0.1, metadata=_help(
        "λ of close_regzero: c' = (λI + Σ W'ᵀW')⁻¹ Σ W'ᵀW⁰ c.", min=0))
    lamb: float = field(default=0.1, metadata=_help("λ₂: pull towards the current weights in each round.", min=0))
    preserve_scale: float = field(default=0.1, metadata=_help("λ₁: weight of the retain rows in each round.", min=0))
    erase_scale: float = field(default=1.0, metadata=_help("s_e: weight of the erased rows in each round.", gt=0))
    retain: list[str] = field(default_factory=lambda: [" "], metadata=_help(
        "Prompts kept in each round, with the target's preserved prompts."))
    retain_per_concept: bool = field(default=True, metadata=_help(
        "Repeat the retain prompts once per concept (the official train.py's [' '] * len(concepts): k concepts weigh "
        "them k times) instead of once."))
    uce_preserve: list[str] = field(default_factory=list, metadata=_help("Prompts the UCE step preserves besides the target's."))
    uce_lamb: float = field(default=0.5, metadata=_help("λ of the UCE step.", min=0))
    uce_erase_scale: float = field(default=1.0, metadata=_help("s_e of the UCE step.", gt=0))
    uce_preserve_scale: float | None = field(default=None, metadata=_help(
        "s_p of the UCE step; None: max(0.1, 1/|P|), 1.0 with only \"\" preserved.", min=0))
    edit_keys: bool = field(default=True, metadata=_help("Edit (and derive c' through) to_k as well as to_v."))
    uce_token_mode: str = field(default="legacy", metadata=_help(
        "The UCE step's token mode; RECE is built on legacy.", choices=["legacy", "last_token", "all_tokens"]))
    contexts: bool = field(default=False, metadata=_help(
        "The UCE step and every round work on every prompt of each target (UCEConfig.contexts) and retain "
        "the prompts the target keeps."))
    keep_concept_erased: bool = field(default=False, metadata=_help(
        "Also retain the concepts' own prompts in every round at their current (erased) outputs; erasekit's, "
        "not the paper's, whose rounds hold earlier edits through lamb alone."))
    adversarial_from_contexts: bool = field(default=True, metadata=_help(
        "With contexts: derive c' from every prompt of each target, not only from the concept itself."))

    def uce_config(self) -> UCEConfig:
        return UCEConfig(
            preserve=list(self.uce_preserve), lamb=self.uce_lamb, erase_scale=self.uce_erase_scale,
            preserve_scale=self.uce_preserve_scale, token_mode=self.uce_token_mode, edit_keys=self.edit_keys,
            contexts=self.contexts,
        )


CONFIG = RECEConfig

# Per concept type, from the RECE README and model card (research notes, section 3.2).
PRESETS = {
    # CharlesGong12/RECE train.py, nudity settings (as "nudity"; section 3.2)
    "paper": {},
    # no official script: UCE's toy edit, then 24 rounds on every caption, retaining the other values' captions at
    # scale 10 and the concept's own, each retain prompt once (docs/toy-presets.md says why each value)
    "toy": {"uce_token_mode": "all_tokens", "contexts": True, "retain": [""], "epochs": 24,
            "regular_scale": 0.1, "preserve_scale": 10.0, "keep_concept_erased": True, "retain_per_concept": False},
    # on a toy style (chosen by the concept's kind): 3 rounds, as the paper's nudity run; 24 cost the other styles
    "toy:style": {"epochs": 3},
    # train.py for nudity: close_regzero λ 0.1, 3 epochs, guide " ", retain [" "] per concept, λ₁ = λ₂ = 0.1
    "nudity": {"epochs": 3, "regular_scale": 1e-1, "retain": [" "]},
    # train.py for the 11 I2P categories (erasekit.methods.uce.I2P_CONCEPTS) at once, chosen by Q16 in the paper:
    # λ 0.1, 2 epochs, retain [' '] * 11
    "unsafe": {"epochs": 2, "regular_scale": 1e-1, "retain": [" "]},
    # train_artists.py: λ 1e-3, 1 epoch, guide "art", retain "" (one artist a run, so once per concept is once);
    # it also keeps the 1,733 other artists: pass them with --preserve (they go to UCE and to the retain set)
    "artist": {"epochs": 1, "regular_scale": 1e-3, "retain": [""], "uce_preserve_scale": 0.1},
    # train_object.py for the "easy" objects (English springer, golf ball, parachute): λ 0.1, 1 epoch, retain ""
    "object": {"epochs": 1, "regular_scale": 1e-1, "retain": [""]},
    # train_object.py for the "difficult" objects (church, garbage truck): λ 1e-3, 1 epoch, retain ""
    "object-difficult": {"epochs": 1, "regular_scale": 1e-3, "retain": [""]},
}


# ------------------------------------------------------------------ step 1: the adversarial embedding
def weight_gram(weights: dict[str, torch.Tensor], others: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_l W_lᵀ V_l (d x d, float64) over the named matrices, with V = W when ``others`` is None."""
    if not weights:
        raise ErasekitError("no matrices given; pass the model's to_k/to_v weights")
    if others is not None and set(others) != set(weights):
        raise ErasekitError("the edited and original weights name different matrices; pass the same to_k/to_v names in both")
    first = next(iter(weights.values()))
    dim, device = first.shape[1], float64_device(first)
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    with torch.no_grad():
        for name, W in weights.items():
            W = W.detach().to(device, torch.float64)
            V = W if others is None else others[name].detach().to(device, torch.float64)
            gram += W.T @ V
    return gram


def adversarial_map_from_grams(edited_gram: torch.Tensor, cross_gram: torch.Tensor, regular_scale: float) -> torch.Tensor:
    """A = (λI + Σ W'ᵀW')⁻¹ Σ W'ᵀW⁰ from the two sums, so that c' = A c (close_regzero)."""
    dim = edited_gram.shape[0]
    system = regular_scale * torch.eye(dim, dtype=torch.float64, device=edited_gram.device) + edited_gram
    cholesky, failed = torch.linalg.cholesky_ex(system)
    if int(failed) != 0:
        if regular_scale <= 0:
            raise ErasekitError(f"λI + Σ W'ᵀW' is singular with regular_scale={regular_scale}; use regular_scale > 0")
        raise ErasekitError(
            f"λI + Σ W'ᵀW' is not positive definite in float64 with regular_scale={regular_scale}: the edited weights are "
            "not finite or too large (RECE's rounds diverged); use fewer epochs or larger lamb / preserve_scale"
        )
    return torch.cholesky_solve(cross_gram, cholesky)


def adversarial_embedding_map(
    edited_weights: dict[str, torch.Tensor], original_weights: dict[str, torch.Tensor], regular_scale: float = 0.1
) -> torch.Tensor:
    """The d x d float64 matrix A with c' = A c: A = (λI + Σ_l W'_lᵀ W'_l)⁻¹ Σ_l W'_lᵀ W⁰_l.

    ``edited_weights`` and ``original_weights`` map the same names to (d_out, d) matrices
    (all to_k and to_v in RECE); any edit of them works, not only RECE's.
    """
    return adversarial_map_from_grams(
        weight_gram(edited_weights), weight_gram(edited_weights, original_weights), regular_scale
    )


def closed_form_adversarial_embedding(
    model,
    concept_embedding: torch.Tensor | Conditioning,
    edited_weights: dict[str, torch.Tensor] | None = None,
    original_weights: dict[str, torch.Tensor] | None = None,
    regular_scale: float = 0.1,
    edit_keys: bool = True,
) -> torch.Tensor | Conditioning:
    """RECE's closed-form adversarial embedding (``close_regzero``) of every token row at once.

    c' = (λI + Σ_l W'_lᵀ W'_l)⁻¹ (Σ_l W'_lᵀ W⁰_l) c over every cross-attention to_k and to_v,
    the minimiser of Σ_l ||W'_l c' - W⁰_l c||² + λ||c'||² (research notes, section 3.1, step 1).

    ``concept_embedding`` is text states of shape (..., tokens, dim) or a :class:`Conditioning`
    (its ``hidden_states`` are replaced, SDXL's pooled embedding is kept); the result has the
    same type, shape, dtype and device. By default W' are the model's current weights (its
    applied erasures included) and W⁰ its original ones (``model.original_parameters``);
    pass ``edited_weights``/``original_weights`` (name -> matrix) to use others, in which case
    ``model`` may be None. ``edit_keys=False`` uses to_v only.
    """
    if model is None and (edited_weights is None or original_weights is None):
        raise ErasekitError("pass a model, or both edited_weights and original_weights")
    if edited_weights is None:
        edited_weights = key_value_weights(model, original=False, edit_keys=edit_keys)
    if original_weights is None:
        original_weights = key_value_weights(model, original=True, edit_keys=edit_keys)
    states = concept_embedding.hidden_states if isinstance(concept_embedding, Conditioning) else concept_embedding
    A = adversarial_embedding_map(edited_weights, original_weights, regular_scale)
    adversarial = (states.detach().to(A.device, torch.float64) @ A.T).to(states.device, states.dtype)
    if isinstance(concept_embedding, Conditioning):
        return concept_embedding.with_hidden_states(adversarial)
    return adversarial


def adversarial_residual(
    edited_weights: dict[str, torch.Tensor], original_weights: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor
) -> float:
    """sqrt(Σ_l ||W'_l x - W⁰_l c||² / Σ_l ||W⁰_l c||²) over the rows x of ``inputs`` and c of ``targets`` (float64).

    How far the edited projections of ``inputs`` are from the original projections of the
    concept rows ``targets``: 0 when the edited model reproduces them exactly, larger when less
    of the concept comes through.
    """
    dim = inputs.shape[-1]
    error, total = 0.0, 0.0
    with torch.no_grad():
        for name, edited in edited_weights.items():
            device = float64_device(edited)
            x = inputs.detach().reshape(-1, dim).to(device, torch.float64)
            c = targets.detach().reshape(-1, dim).to(device, torch.float64)
            reference = c @ original_weights[name].detach().to(device, torch.float64).T
            error += float(((x @ edited.detach().to(device, torch.float64).T) - reference).square().sum())
            total += float(reference.square().sum())
    return (error / total) ** 0.5 if total > 0 else 0.0


# ---------------------------------------------------------------------------------- the rounds
def transform_deltas(original_weights: dict[str, torch.Tensor], transform: torch.Tensor) -> dict[str, torch.Tensor]:
    """W⁰_l (S - I) for every matrix: the deltas of the edit W'_l = W⁰_l S, in float32 (computed in float64)."""
    change = transform - torch.eye(transform.shape[0], dtype=transform.dtype, device=transform.device)
    with torch.no_grad():
        return {
            name: (W.detach().to(change.device, torch.float64) @ change).to(W.device, torch.float32)
            for name, W in original_weights.items()
        }


def _relative_residual(original_gram: torch.Tensor, transform: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """:func:`adversarial_residual` for W'_l = W⁰_l S, from H⁰ = Σ W⁰ᵀW⁰: Σ_rows rᵀH⁰r with r = S x - c."""
    r = inputs @ transform.T - targets
    total = float(((targets @ original_gram) * targets).sum())
    return (float(((r @ original_gram) * r).sum()) / total) ** 0.5 if total > 0 else 0.0


def rece_rounds(
    original_weights: dict[str, torch.Tensor],
    start_transform: torch.Tensor,
    concept_states: torch.Tensor,
    guide_states: torch.Tensor,
    retain_rows: torch.Tensor | None,
    config: RECEConfig,
    score: Callable[[dict[str, torch.Tensor]], float] | None = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """RECE's rounds from a UCE edit, on text states given directly (no text encoder needed).

    ``original_weights`` are W⁰ by name; ``start_transform`` is the UCE edit as a d x d matrix
    (``UCESolution.transform()``, W' = W⁰ T_uce); ``concept_states`` (concepts, tokens, dim) is
    every concept prompt's full embedding, ``guide_states`` (tokens, dim) the guide prompt's, or
    (concepts, tokens, dim) one guide per concept prompt, and
    ``retain_rows`` (rows, dim) the retain prompts' rows. ``score(deltas)`` scores a round (lower
    is better) and the best round is kept; without it the last one. Returns (deltas from W⁰, info).
    """
    if concept_states.ndim == 2:
        concept_states = concept_states.unsqueeze(0)
    if guide_states.ndim == 3 and guide_states.shape[0] != concept_states.shape[0]:
        raise ErasekitError(
            f"{guide_states.shape[0]} guide prompts for {concept_states.shape[0]} concept prompts; pass one guide, or one per concept prompt"
        )
    if concept_states.shape[-2:] != guide_states.shape[-2:]:
        raise ErasekitError(
            f"concept states {tuple(concept_states.shape)} and guide states {tuple(guide_states.shape)} differ in tokens or dim; "
            "encode them with the same model"
        )
    original_gram = weight_gram(original_weights)  # H⁰ = Σ W⁰ᵀW⁰, once
    device, dim = original_gram.device, guide_states.shape[-1]
    concept_rows = concept_states.reshape(-1, dim).to(device, torch.float64)
    if guide_states.ndim == 2:  # one guide for every concept prompt
        guide_states = guide_states.unsqueeze(0).expand(concept_states.shape[0], -1, -1)
    guide_rows = guide_states.reshape(-1, dim).to(device, torch.float64)  # row k of each c' -> row k of its guide
    transform = start_transform.to(device, torch.float64)  # S, with W' = W⁰ S
    scores, before, after = [], [], []
    best_transform, best_epoch = None, None
    for epoch in tqdm(range(config.epochs), desc="RECE", disable=not progress, leave=False):
        # step 1: c' = (λI + Σ W'ᵀW')⁻¹ Σ W'ᵀW⁰ c, with Σ W'ᵀW' = Sᵀ H⁰ S and Σ W'ᵀW⁰ = Sᵀ H⁰
        A = adversarial_map_from_grams(transform.T @ original_gram @ transform, transform.T @ original_gram, config.regular_scale)
        adversarial_rows = concept_rows @ A.T
        before.append(_relative_residual(original_gram, transform, adversarial_rows, concept_rows))
        # step 2: UCE-erase c' towards the guide, anchored on the current weights: W' <- W' T
        solution = uce_solve(adversarial_rows, guide_rows, retain_rows, config.lamb, config.erase_scale, config.preserve_scale)
        transform = transform @ solution.transform()
        after.append(_relative_residual(original_gram, transform, adversarial_rows, concept_rows))
        if score is not None:
            scores.append(float(score(transform_deltas(original_weights, transform))))
            if best_transform is None or scores[-1] < scores[best_epoch]:
                best_transform, best_epoch = transform, epoch
    if best_transform is None:
        best_transform, best_epoch = transform, config.epochs - 1
    info = {
        "epochs": config.epochs,
        "chosen_epoch": best_epoch,  # 0 = after the first round (RECE's *_ep0); -1 = the UCE edit alone (epochs=0)
        "scores": scores if score is not None else None,
        # relative error of the edited projections of c' against the original ones of c, before and after each round
        "adversarial_residual_before": [round(r, 6) for r in before],
        "adversarial_residual_after": [round(r, 6) for r in after],
    }
    return transform_deltas(original_weights, best_transform), info


def retain_prompts(retain: list[str], others: list[str], concepts: int, per_concept: bool = True) -> list[str]:
    """The prompts whose rows every round retains: ``retain`` once per concept (the official train.py's
    ``[' '] * len(concepts)``: repeated rows weigh k times in λ₁ Σ p pᵀ) or, without ``per_concept``, once;
    then ``others`` (preserved and kept prompts), each once and not again when already retained."""
    retain = list(dict.fromkeys(retain))
    head = retain * max(concepts, 1) if per_concept else retain
    return head + [p for p in dict.fromkeys(others) if p not in retain]


def _check(config: RECEConfig) -> None:
    if config.epochs < 0:
        raise ErasekitError(f"epochs={config.epochs}; RECE needs epochs >= 0")
    if config.uce_token_mode not in ("legacy", "last_token", "all_tokens"):
        raise ErasekitError(f"unknown uce_token_mode {config.uce_token_mode!r}; use legacy, last_token or all_tokens")
    if config.regular_scale < 0 or config.lamb < 0 or config.preserve_scale < 0 or config.erase_scale <= 0:
        raise ErasekitError("RECE needs regular_scale, lamb, preserve_scale >= 0 and erase_scale > 0; fix the --set values")


def erase(
    model,
    targets: list[EraseTarget],
    config: RECEConfig | None = None,
    progress: bool = True,
    validate: Callable | None = None,
) -> Erasure:
    """Erase the targets with RECE: legacy UCE, then ``config.epochs`` closed-form rounds.

    ``validate(model) -> float`` (lower is better), when given, scores each round's result
    applied to ``model``; the best round is kept, and every score and the chosen round are
    in ``erasure.info``. The targets' preserved prompts are kept by the UCE step and by every round.
    """
    config = config or RECEConfig()
    _check(config)
    require(targets, "guides", "rece", "or --guide")
    concepts = [t.concept for t in targets]
    started = time.perf_counter()
    config_dict = dataclasses.asdict(config)

    uce_solution, original, uce_info = uce_edit(model, targets, config.uce_config())

    retain = [p for t in targets for p in t.preserve]
    if config.contexts:
        retain += [p for t in targets for p in t.kept]
    guide_of = {}  # each erased prompt's guide
    for target in targets:
        count = len(target.prompts) if config.contexts and config.adversarial_from_contexts else 1
        for prompt, guide in zip(target.prompts[:count], target.guides[:count]):
            guide_of.setdefault(prompt, guide)
    concept_prompts, guides = list(guide_of), list(guide_of.values())
    if config.keep_concept_erased:
        retain += concept_prompts
    retain = retain_prompts(config.retain, retain, len(targets), config.retain_per_concept)
    count = len(concept_prompts)
    states = encode_guides(model, [*concept_prompts, *guides, *retain])
    concept_states, guide_states = states[:count], states[count : 2 * count]
    retain_rows = states[2 * count :].reshape(-1, states.shape[-1])

    score = None
    if validate is not None:
        def score(deltas):
            candidate = Erasure.from_deltas(model, "rece", concepts, config_dict, deltas)
            candidate.apply(model)
            try:
                return float(validate(model))
            finally:
                candidate.remove(model)

    deltas, info = rece_rounds(original, uce_solution.transform(), concept_states, guide_states, retain_rows, config, score, progress)
    info["uce"] = uce_info
    info["retain_prompts"], info["retain_rows"] = len(retain), int(retain_rows.shape[0])
    info["targets"] = [t.describe() for t in targets]
    info["seconds"] = round(time.perf_counter() - started, 3)
    return Erasure.from_deltas(model, "rece", concepts, config_dict, deltas, info)
