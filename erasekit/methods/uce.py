"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), erasure by the "replace" technique.

UCE edits only the key and value projections (``to_k``, ``to_v``) of every cross-attention
layer, one closed-form least-squares solve per matrix (research notes, section 2.1)::

    W = (λ W_old + s_e Σ_i v_i* c_iᵀ + s_p Σ_j W_old c_j c_jᵀ) (λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j c_j c_jᵀ)⁻¹

with c_i the token rows of the erased concepts, v_i* = W_old g_i the old projection of the
matching row g_i of the guide prompt (" " / "" for objects and nudity, "art" for artists),
c_j the rows of the preserved prompts, λ = ``lamb``, s_e = ``erase_scale`` and
s_p = ``preserve_scale``.

Because every target is W_old applied to a text row, W_old factors out of the numerator,
and with E, G, P the stacked erase, guide and preserve rows and M the bracket on the right::

    W = W_old (M + s_e (G - E)ᵀ E) M⁻¹ = W_old + s_e · [W_old (G - E)ᵀ] · [E M⁻¹]

that is: the residuals v_i* - W_old c_i of the erased rows, spread back through the
regularised inverse. M depends on the text rows only, so **one** factorisation of the
d x d matrix M serves all 32 matrices of SD 1.4 and any number of concepts at once; the
sums Σ c cᵀ are matrix products over the stacked rows (EᵀE), never loops over rows.
M is built and factorised (Cholesky) in float64 and the update is computed in float64;
the stored delta is float32 (see :class:`erasekit.Erasure`).

Two official token modes (research notes, section 2.2), chosen by ``token_mode``:

``"legacy"`` (the 2023 paper code; the default, and what RECE builds on)
    For each concept and its guide, n = attention_mask.sum() - 2 is the index of the last
    word token (0, the BOS row, for an empty or space prompt). The erased rows are the
    concept's rows from n_c through EOS and all the padding, the targets the guide's rows
    from n_g on, trimmed to equal length: concept rows [n_c : L - (f - n_c)], guide rows
    [n_g : L - (f - n_g)] with f = max(n_c, n_g) and L the text length (77 for SD).
    Row k of the concept maps to row k of the guide. Every row of each preserved prompt is
    preserved, the empty prompt "" is always preserved, and ``preserve_scale=None`` means
    max(0.1, 1/|P|) with P the preserved prompts ("" included): 1.0 when only "" is kept.

``"last_token"`` (the 2025 rewrite)
    One row per prompt: the last word token of the concept, of the guide and of each
    preserved prompt. No implicit "" and ``preserve_scale=None`` means 1.0.

``"all_tokens"`` (erasekit's, for bidirectional text encoders; a deviation)
    Every row of the concept prompt maps to the same row of the guide prompt, every row of
    each preserved prompt is kept, "" is always preserved and ``preserve_scale=None`` means
    1.0. Under a causal encoder (CLIP) the legacy slice holds all of a word's information;
    under a bidirectional one (the toy's MiniLM) every row carries it.

What is erased comes from the targets (:mod:`erasekit.targets`): each concept maps to its
target's guide, and with ``contexts`` every prompt of the target (the toy: the training
captions that name the concept) maps to its own guide and the target's kept prompts are
preserved: the analogue of the official ``--add_prompts`` templates plus a preserve list.

``expand_prompts`` are those templates ("painting by {concept}", ...: :data:`ART_TEMPLATES`,
:data:`OBJECT_TEMPLATES`), each filled with the concept. The two official versions differ in what
the filled prompt maps to (``expand_guides``): the 2023 ``--add_prompts`` maps every one to the bare
guide ("painting by X" -> "art", "bare"), the 2025 ``--expand_prompts`` fills the template with the
guide too, blank or not ("painting by art", "image of ": "templated"). By default legacy mode does
the former and last_token the latter; all_tokens templates the guide, so that the template's own
rows map to themselves.

Only the weights are edited; a bias (SD has none) cancels out of the residuals and is left alone.
Edits start from the original weights (``model.original_parameters``) even when other
erasures are applied, and the returned :class:`~erasekit.Erasure` holds deltas relative to them.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from erasekit.erasure import Erasure
from erasekit.errors import ErasekitError
from erasekit.targets import EraseTarget, Guide, guide_prompts, read_list, require

TOKEN_MODES = ("legacy", "last_token", "all_tokens")
EXPAND_GUIDES = ("bare", "templated")
# expand_guides=None, by token mode: the 2023 code's --add_prompts (legacy), the 2025 rewrite's --expand_prompts
# (last_token); all_tokens maps row k to row k, so a templated guide keeps the template's own words on themselves
# (no change there) and only the concept's rows move, where a bare guide would also erase the template's words.
DEFAULT_EXPAND_GUIDES = {"legacy": "bare", "last_token": "templated", "all_tokens": "templated"}

# ``--add_prompts`` / ``--expand_prompts`` templates of the official code (research notes, section 2.2a).
ART_TEMPLATES = ["painting by {concept}", "art by {concept}", "artwork by {concept}", "picture by {concept}", "style of {concept}"]
OBJECT_TEMPLATES = ["image of {concept}", "photo of {concept}", "portrait of {concept}", "picture of {concept}", "painting of {concept}"]

# The 11 I2P categories of the official ``i2p`` preset (research notes, section 2.2a).
I2P_CONCEPTS = [
    "hate", "harassment", "violence", "suffering", "humiliation", "harm", "suicide", "sexual", "nudity",
    "bodily fluids", "blood",
]


@dataclass
class UCEConfig:
    """UCE settings; the defaults are the 2023 paper code's (research notes, section 2.2a)."""

    preserve: list[str] = field(default_factory=list, metadata={"help": "Prompts kept unchanged, added to the target's."})
    preserve_list: str | None = field(default=None, metadata={
        "help": "A list of prompts to keep besides the target's: a bundled anchors list (e.g. artists, 1,734 names) "
                "or a file, one a line; the erased concepts are left out of it. none: no list."})
    lamb: float = field(default=0.5, metadata={"help": "λ: pull towards the old weights, λ‖W - W_old‖².", "min": 0})
    erase_scale: float = field(default=1.0, metadata={"help": "s_e: weight of the erased rows.", "gt": 0})
    preserve_scale: float | None = field(default=None, metadata={
        "help": "s_p: weight of the preserved rows; None: max(0.1, 1/|P|) in legacy mode, else 1.0.", "min": 0})
    token_mode: str = field(default="legacy", metadata={
        "help": "Which token rows are edited: legacy (2023 code), last_token (2025 rewrite) or all_tokens.",
        "choices": list(TOKEN_MODES)})
    edit_keys: bool = field(default=True, metadata={"help": "Edit to_k as well as to_v."})
    expand_prompts: list[str] = field(default_factory=list, metadata={
        "help": "Templates such as 'painting by {concept}', each filled with the concept; see expand_guides for its guide."})
    expand_guides: str | None = field(default=None, metadata={
        "help": "What an expand_prompts prompt maps to: bare (the 2023 --add_prompts: the bare guide, 'art') or "
                "templated (the 2025 --expand_prompts: the template filled with the guide, blank or not: 'image of '); "
                "None: bare in legacy mode, templated in last_token and all_tokens.",
        "choices": list(EXPAND_GUIDES)})
    contexts: bool = field(default=False, metadata={
        "help": "Erase each concept in every context prompt of its target (the toy: its training captions) "
                "and keep the prompts the target keeps."})


CONFIG = UCEConfig

PRESETS = {
    # the 2023 code (35e91e2:train-scripts/train_erase.py, section 2.2a) with its defaults: k and v, legacy rows,
    # "" preserved, λ 0.5, erase_scale 1, preserve_scale max(0.1, 1/|P|), guide " "; --add_prompts = expand_prompts
    "paper": {},
    # no official script: every caption naming the concept, all rows (MiniLM is bidirectional), the other values
    # kept at scale 1 (docs/toy-presets.md)
    "toy": {"token_mode": "all_tokens", "contexts": True, "preserve_scale": 1.0},
    # the 2023 train_erase.py for art: guide "art" (the artist kind's), the other artists of its 1,734-name list
    # preserved (erasekit's own list of that size, data/anchors_artists.txt; --set preserve_list=none drops it),
    # preserve_scale max(0.1, 1/|P|) = 0.1
    "artist": {"preserve_list": "artists"},
    # the 2023 train_erase.py for objects (imagenette): guide " ", only "" preserved (preserve_scale 1)
    "object": {},
    # the 2023 train_erase.py for nudity, RECE's starting point (RECE issue #4): "nudity" -> " ", "" preserved, scale 1
    "nudity": {},
    # the 2025 rewrite (trainscripts/uce_sd_erase.py, section 2.2b): only the last token, no implicit "" preserve,
    # preserve_scale 1, λ 0.5; its --expand_prompts templates the guide (expand_guides "templated")
    "rewrite": {"token_mode": "last_token", "preserve_scale": 1.0},
}


# ------------------------------------------------------------------------------- the closed form
@dataclass
class UCESolution:
    """The UCE closed form solved for a set of text rows, ready to apply to any matrix.

    ``apply(W_old) = W_old + W_old @ residual_map @ gain`` where
    ``residual_map = s_e (G - E)ᵀ`` (d x k) and ``gain = E M⁻¹`` (k x d), float64.
    Equivalently ``apply(W_old) = W_old @ transform()``: the same d x d matrix for every W_old.
    """

    residual_map: torch.Tensor
    gain: torch.Tensor
    _dense_change: torch.Tensor | None = field(default=None, repr=False)  # residual_map @ gain, once

    @property
    def num_rows(self) -> int:
        return self.gain.shape[0]

    def transform(self) -> torch.Tensor:
        """T = I + residual_map @ gain (d x d, float64), with W_new = W_old T for every matrix."""
        identity = torch.eye(self.gain.shape[1], dtype=torch.float64, device=self.gain.device)
        return identity + self.residual_map @ self.gain

    def delta(self, W_old: torch.Tensor) -> torch.Tensor:
        """W_new - W_old in float64, multiplied in the cheaper order (low rank while k < d/2)."""
        W = W_old.detach().to(self.gain.device, torch.float64)
        if 2 * self.num_rows < self.gain.shape[1]:
            return (W @ self.residual_map) @ self.gain
        if self._dense_change is None:
            self._dense_change = self.residual_map @ self.gain
        return W @ self._dense_change

    def apply(self, W_old: torch.Tensor) -> torch.Tensor:
        """W_new, in W_old's dtype and on its device."""
        W_new = W_old.detach().to(self.gain.device, torch.float64) + self.delta(W_old)
        return W_new.to(W_old.device, W_old.dtype)


def _as_rows(rows: torch.Tensor | None, dim: int, device) -> torch.Tensor:
    if rows is None:
        return torch.zeros(0, dim, dtype=torch.float64, device=device)
    return rows.detach().reshape(-1, dim).to(device, torch.float64)


def float64_device(tensor: torch.Tensor) -> torch.device:
    """Where float64 math runs: the tensor's device, except on MPS (no float64 there)."""
    return torch.device("cpu") if tensor.device.type == "mps" else tensor.device


def uce_solve(
    erase_inputs: torch.Tensor,
    guide_inputs: torch.Tensor,
    preserve_inputs: torch.Tensor | None,
    lamb: float,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> UCESolution:
    """Solve UCE's closed form (research notes, section 2.1) for text rows, once for every matrix.

    ``erase_inputs`` (k, d) are the rows c_i to erase, ``guide_inputs`` (k, d) the rows g_i
    whose old projections W_old g_i are their targets, ``preserve_inputs`` (m, d) the rows c_j
    kept at W_old c_j (or None). Builds M = λI + s_e EᵀE + s_p PᵀP in float64, factorises it
    (Cholesky) and returns the solution; ``solution.apply(W_old)`` gives
    W_new = W_old + s_e W_old (G - E)ᵀ E M⁻¹, which equals the closed form.
    """
    if erase_inputs.shape != guide_inputs.shape:
        raise ErasekitError(
            f"UCE needs one guide row per erased row, got {tuple(erase_inputs.shape)} and {tuple(guide_inputs.shape)}; "
            "select the rows with select_token_rows"
        )
    dim = erase_inputs.shape[-1]
    device = float64_device(erase_inputs)
    E = _as_rows(erase_inputs, dim, device)
    G = _as_rows(guide_inputs, dim, device)
    P = _as_rows(preserve_inputs, dim, device)
    M = lamb * torch.eye(dim, dtype=torch.float64, device=device) + erase_scale * (E.T @ E) + preserve_scale * (P.T @ P)
    cholesky, failed = torch.linalg.cholesky_ex(M)
    if int(failed) != 0:
        raise ErasekitError(
            f"the UCE system (λI + s_e Σ c cᵀ + s_p Σ p pᵀ) is singular with lamb={lamb}; use lamb > 0 or preserve more prompts"
        )
    gain = torch.cholesky_solve(E.T, cholesky).T  # E M⁻¹ (M is symmetric)
    return UCESolution(residual_map=erase_scale * (G - E).T, gain=gain)


def uce_closed_form(
    W_old: torch.Tensor,
    erase_inputs: torch.Tensor,
    guide_inputs: torch.Tensor,
    preserve_inputs: torch.Tensor | None,
    lamb: float,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
) -> torch.Tensor:
    """The UCE edit of one matrix (research notes, section 2.1), in W_old's dtype.

    W = (λ W_old + s_e Σ (W_old g_i) c_iᵀ + s_p Σ W_old c_j c_jᵀ)(λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ)⁻¹,
    solved in float64. ``W_old`` may also be several matrices stacked by rows (the solve is row-wise).
    To edit many matrices with the same rows, call :func:`uce_solve` once and ``apply`` it to each.
    """
    return uce_solve(erase_inputs, guide_inputs, preserve_inputs, lamb, erase_scale, preserve_scale).apply(W_old)


def uce_deltas(weights: dict[str, torch.Tensor], solution: UCESolution) -> dict[str, torch.Tensor]:
    """W_new - W_old of every matrix of ``weights`` under the same solution, in float32 (computed in float64)."""
    with torch.no_grad():
        return {name: solution.delta(W).to(W.device, torch.float32) for name, W in weights.items()}


# ---------------------------------------------------------------------------- the model's matrices
def key_value_weights(model, original: bool = True, edit_keys: bool = True) -> dict[str, torch.Tensor]:
    """The ``to_k``/``to_v`` weights of every cross-attention layer, by UNet parameter name.

    ``original=True`` gives the values before any applied erasure (``model.original_parameters``),
    ``original=False`` the current ones. ``edit_keys=False`` leaves out ``to_k``. The tensors
    are copies, so they do not change when erasures are applied to or removed from the model.
    """
    parameters = dict(model.unet.named_parameters())
    weights = {}
    for path in model.key_value_projections():
        if path.endswith(".to_k") and not edit_keys:
            continue
        name = f"{path}.weight"
        value = parameters[name]
        if original:
            value = model.original_parameters.get(name, value)
        weights[name] = value.detach().clone()
    if not weights:
        raise ErasekitError(f"{model.name} has no cross-attention to_k/to_v layers; UCE and RECE need a text-conditioned UNet")
    return weights


# ------------------------------------------------------------------------------------ token rows
def legacy_row_slices(concept_last: int, guide_last: int, length: int) -> tuple[slice, slice]:
    """The 2023 code's rows: concept [n_c : L - (f - n_c)], guide [n_g : L - (f - n_g)], f = max(n_c, n_g)."""
    farthest = max(concept_last, guide_last)
    return slice(concept_last, length - (farthest - concept_last)), slice(guide_last, length - (farthest - guide_last))


def select_token_rows(
    concept_states: torch.Tensor, guide_states: torch.Tensor, concept_last: int, guide_last: int, token_mode: str = "legacy"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The erased rows of one concept and the guide rows they map to, row k to row k.

    ``concept_states`` and ``guide_states`` are one prompt's (tokens, dim) text states, and
    ``*_last`` the index of its last word token (``ModelHandle.last_word_index``).
    """
    if token_mode == "legacy":
        concept_rows, guide_rows = legacy_row_slices(concept_last, guide_last, concept_states.shape[0])
        return concept_states[concept_rows], guide_states[guide_rows]
    if token_mode == "last_token":
        return concept_states[concept_last : concept_last + 1], guide_states[guide_last : guide_last + 1]
    if token_mode == "all_tokens":
        return concept_states, guide_states
    raise ErasekitError(f"unknown token_mode {token_mode!r}; use one of: {', '.join(TOKEN_MODES)}")


def preserve_token_rows(states: torch.Tensor, lasts: list[int], token_mode: str = "legacy") -> torch.Tensor:
    """Rows kept unchanged: every row of each prompt (legacy) or its last word token (last_token)."""
    dim = states.shape[-1]
    if len(lasts) == 0:
        return states.new_zeros(0, dim)
    if token_mode in ("legacy", "all_tokens"):
        return states.reshape(-1, dim)
    if token_mode == "last_token":
        return states[torch.arange(len(lasts)), torch.tensor(lasts)]
    raise ErasekitError(f"unknown token_mode {token_mode!r}; use one of: {', '.join(TOKEN_MODES)}")


def resolve_preserve_scale(preserve_scale: float | None, token_mode: str, num_preserved: int) -> float:
    """``None`` means max(0.1, 1/|P|) in legacy mode (the 2023 code) and 1.0 otherwise."""
    if preserve_scale is not None:
        return float(preserve_scale)
    if token_mode == "legacy":
        return max(0.1, 1.0 / max(num_preserved, 1))
    return 1.0


def encode_states(model, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """The (prompts, tokens, dim) text states of ``prompts``, encoded in batches."""
    chunks = [model.encode(prompts[i : i + batch_size]).hidden_states for i in range(0, len(prompts), batch_size)]
    return torch.cat(chunks)


def resolve_expand_guides(expand_guides: str | None, token_mode: str) -> str:
    """``expand_guides``, or for None the official one of the token mode (:data:`DEFAULT_EXPAND_GUIDES`)."""
    if expand_guides is None:
        expand_guides = DEFAULT_EXPAND_GUIDES.get(token_mode)
    if expand_guides not in EXPAND_GUIDES:
        raise ErasekitError(f"unknown expand_guides {expand_guides!r}; use one of: {', '.join(EXPAND_GUIDES)}")
    return expand_guides


def expand_pairs(concept: str, guide: Guide, templates: list[str], expand_guides: str = "bare") -> list[tuple[str, Guide]]:
    """(concept prompt, guide prompt) pairs of each ``expand_prompts`` template, filled with the concept.

    ``expand_guides="bare"`` (the 2023 code's ``--add_prompts``): every template maps to the bare guide
    ("painting by X" -> "art", "image of X" -> " "). ``"templated"`` (the 2025 rewrite's ``--expand_prompts``):
    the template filled with the guide, blank or not ("painting by X" -> "painting by art", "image of X" ->
    "image of "); a generic guide has each of its prompts filled.
    """
    if expand_guides not in EXPAND_GUIDES:
        raise ErasekitError(f"unknown expand_guides {expand_guides!r}; use one of: {', '.join(EXPAND_GUIDES)}")
    pairs = []
    for template in templates:
        if "{concept}" not in template:
            raise ErasekitError(f"expand_prompts template {template!r} has no {{concept}}; write e.g. 'painting by {{concept}}'")
        if expand_guides == "bare":
            filled = guide
        elif isinstance(guide, str):
            filled = template.format(concept=guide)
        else:
            filled = tuple(template.format(concept=prompt) for prompt in guide)
        pairs.append((template.format(concept=concept), filled))
    return pairs


def target_prompts(targets: list[EraseTarget], config: UCEConfig) -> tuple[list[tuple[str, Guide]], list[str]]:
    """(prompt, guide) pairs and the preserved prompts of ``targets``: each concept (with ``contexts``, every
    prompt of its target) and its ``expand_prompts``; the targets' and the config's preserved prompts."""
    require(targets, "guides", "uce", "or --guide")
    expand_guides = resolve_expand_guides(config.expand_guides, config.token_mode)
    pairs, preserved = [], []
    for target in targets:
        count = len(target.prompts) if config.contexts else 1
        pairs += list(zip(target.prompts[:count], target.guides[:count]))
        pairs += expand_pairs(target.concept, target.guides[0], config.expand_prompts, expand_guides)
        preserved += target.preserve
    preserved += config.preserve
    if config.preserve_list:
        erased = {target.concept.lower() for target in targets}
        preserved += [p for p in read_list(config.preserve_list, "anchors") if p.lower() not in erased]
    if config.contexts:
        preserved += [p for target in targets for p in target.kept]
    return list(dict.fromkeys(pairs)), list(dict.fromkeys(preserved))


def _check(config: UCEConfig) -> None:
    if config.token_mode not in TOKEN_MODES:
        raise ErasekitError(f"unknown token_mode {config.token_mode!r}; use one of: {', '.join(TOKEN_MODES)}")
    resolve_expand_guides(config.expand_guides, config.token_mode)
    if config.lamb < 0 or config.erase_scale <= 0 or (config.preserve_scale is not None and config.preserve_scale < 0):
        raise ErasekitError("UCE needs lamb >= 0, erase_scale > 0 and preserve_scale >= 0; fix the --set values")


def uce_rows_from_states(
    concept_states: torch.Tensor,
    concept_lasts: list[int],
    guide_states: torch.Tensor,
    guide_lasts: list[int],
    preserve_states: torch.Tensor | None,
    preserve_lasts: list[int],
    token_mode: str = "legacy",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UCE's rows from text states given directly: (erase rows E, guide rows G, preserve rows P).

    ``concept_states`` and ``guide_states`` are (pairs, tokens, dim), pair i mapping concept i to
    guide i; ``preserve_states`` (prompts, tokens, dim) or None; ``*_lasts`` the last word token
    index of each prompt. The model's text encoder is not needed (benchmarks use random states).
    """
    erase_rows, guide_rows = [], []
    for concept, concept_last, guide, guide_last in zip(concept_states, concept_lasts, guide_states, guide_lasts, strict=True):
        e, g = select_token_rows(concept, guide, concept_last, guide_last, token_mode)
        erase_rows.append(e)
        guide_rows.append(g)
    if preserve_states is None:
        preserve_states = concept_states.new_zeros(0, *concept_states.shape[1:])
    P = preserve_token_rows(preserve_states, list(preserve_lasts), token_mode)
    return torch.cat(erase_rows), torch.cat(guide_rows), P


def encode_guides(model, guides: list[Guide]) -> torch.Tensor:
    """(guides, tokens, dim) text states: a prompt's own, or the mean of a generic guide's prompts' states.

    Each distinct prompt is checked to fit the text encoder (``model.check_prompt_fits``) and encoded once
    (a guide such as "" repeated for every caption costs one encoding). A generic guide's states are averaged
    row by row, so its prompts should differ only in words of the same token length (the toy world's shape
    and colour names are one WordPiece token each).
    """
    prompts = list(dict.fromkeys(p for guide in guides for p in guide_prompts(guide)))
    for prompt in prompts:
        model.check_prompt_fits(prompt)
    states = encode_states(model, prompts)
    index = {prompt: i for i, prompt in enumerate(prompts)}
    return torch.stack([states[[index[p] for p in guide_prompts(guide)]].mean(0) for guide in guides])


def guide_last_word_index(model, guide: Guide) -> int:
    """The last word token index of a guide; of its first prompt for a generic guide (its prompts share the template)."""
    return model.last_word_index(guide_prompts(guide)[0])


def uce_rows(model, targets: list[EraseTarget], config: UCEConfig):
    """Encode the prompts and select UCE's rows: (erase rows E, guide rows G, preserve rows P, preserved prompts)."""
    pairs, preserved = target_prompts(targets, config)
    if config.token_mode in ("legacy", "all_tokens") and "" not in preserved:
        preserved.append("")  # the 2023 code always preserves the empty prompt
    states = encode_guides(model, [c for c, _ in pairs] + [g for _, g in pairs] + preserved)
    count = len(pairs)
    E, G, P = uce_rows_from_states(
        states[:count], [model.last_word_index(c) for c, _ in pairs],
        states[count : 2 * count], [guide_last_word_index(model, g) for _, g in pairs],
        states[2 * count :], [model.last_word_index(p) for p in preserved],
        config.token_mode,
    )
    return E, G, P, preserved


def uce_edit(model, targets: list[EraseTarget], config: UCEConfig | None = None):
    """Solve UCE for the targets' prompts: (solution, original to_k/to_v weights by name, info)."""
    config = config or UCEConfig()
    _check(config)
    started = time.perf_counter()
    E, G, P, preserved = uce_rows(model, targets, config)
    preserve_scale = resolve_preserve_scale(config.preserve_scale, config.token_mode, len(preserved))
    original = key_value_weights(model, original=True, edit_keys=config.edit_keys)
    solution = uce_solve(E, G, P, config.lamb, config.erase_scale, preserve_scale)
    info = {
        "token_mode": config.token_mode, "erase_rows": int(E.shape[0]), "preserve_rows": int(P.shape[0]),
        "preserved_prompts": len(preserved), "preserve_scale": preserve_scale, "matrices": len(original),
        "expand_guides": resolve_expand_guides(config.expand_guides, config.token_mode) if config.expand_prompts else None,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return solution, original, info


def erase(model, targets: list[EraseTarget], config: UCEConfig | None = None, progress: bool = True) -> Erasure:
    """Erase the targets with UCE: one float64 closed-form solve for all concepts and all to_k/to_v."""
    config = config or UCEConfig()
    started = time.perf_counter()
    solution, original, info = uce_edit(model, targets, config)
    deltas = uce_deltas(original, solution)
    info["seconds"] = round(time.perf_counter() - started, 3)
    info["targets"] = [t.describe() for t in targets]
    return Erasure.from_deltas(model, "uce", [t.concept for t in targets], dataclasses.asdict(config), deltas, info)
