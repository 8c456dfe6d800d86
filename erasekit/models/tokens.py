"""Text-encoder token utilities: encode with supplied token embeddings, project to tokens (attacks and adversarial training).

An attack that optimises words (UnlearnDiffAtk's prefix, P4D's prompt, Ring-A-Bell's genetic
search, textual inversion's new token) works on the text encoder's **input** token embeddings:

* :func:`token_template` lays out a prompt as token ids with "slots", positions whose input
  embeddings the attack supplies (a prefix, one token after every K words, or a word replaced
  by a placeholder);
* :func:`encode_slots` runs the text encoder with the slots' input embeddings replaced and
  returns the UNet :class:`~erasekit.Conditioning`, differentiably. The replacement is a
  forward hook on the encoder's input embedding module, so the encoder's own forward runs
  unchanged: BERT (the toy model's MiniLM) and CLIP (SD 1.x/2.x) alike;
* :func:`project_to_tokens` maps embeddings to the nearest vocabulary tokens (L2), and
  :func:`encode_ids` encodes token ids (the projected, "hard" prompt) exactly.

Models with several text encoders (SDXL: ``text_encoder`` and ``text_encoder_2``, embedding sizes
768 and 1280) get one slot embedding per encoder: ``slot_embeddings`` is then a list with one
(slots, dim_k) tensor per encoder, the hook is set on every encoder's input embedding, and the
returned conditioning has both the concatenated token states and the pooled ``text_embeds`` of
``text_encoder_2``, all differentiable. SDXL's two CLIP tokenizers share one vocabulary (same
``vocab.json``; only the padding token differs), so a token id names the same word in both
encoders: templates are laid out once, and projection picks one id per slot for both encoders
(:func:`check_shared_vocabulary` refuses models where that does not hold).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from erasekit.errors import ErasekitError
from erasekit.models.handle import Conditioning


@dataclass
class TokenTemplate:
    """A prompt as a full, padded token sequence, with the positions whose embeddings are supplied."""

    input_ids: torch.Tensor  # (tokens,) long, padded to model.max_length
    attention_mask: torch.Tensor  # (tokens,) 1 for real tokens (BOS ... EOS), 0 for padding
    slots: list[int]  # positions whose input embeddings are replaced

    def with_slot_ids(self, slot_ids: torch.Tensor) -> "TokenTemplate":
        """The same template with real token ids written into the slots (a hard prompt)."""
        ids = self.input_ids.clone()
        ids[self.slots] = slot_ids.to(ids.device, ids.dtype)
        return replace(self, input_ids=ids)


def check_shared_vocabulary(model) -> None:
    """Fail clearly unless every tokenizer of the model maps the same words to the same ids.

    Token attacks write one id per slot into one template for all text encoders; SDXL's two CLIP
    tokenizers share CLIP's vocabulary (only their padding tokens differ), so this holds there.
    """
    if len(model.tokenizers) < 2:
        return
    first = model.tokenizers[0].get_vocab()
    for index, tokenizer in enumerate(model.tokenizers[1:], start=1):
        if tokenizer.get_vocab() != first:
            raise ErasekitError(
                f"tokenizer {index} has another vocabulary than tokenizer 0, so one token id does not name the same word "
                "in every text encoder; token attacks (soft-prompt, unlearndiff, p4d, ring-a-bell, textual-inversion) "
                "need one shared vocabulary; use closed-form or paraphrase on this model"
            )


def input_embedding_matrix(model, encoder_index: int = 0) -> torch.Tensor:
    """The text encoder's input token-embedding matrix (vocabulary, dim); a view, not a copy."""
    return model.text_encoders[encoder_index].get_input_embeddings().weight


def per_encoder(model, embeddings, what: str = "slot embeddings") -> list[torch.Tensor]:
    """``embeddings`` as a list with one tensor per text encoder, checked against each encoder's embedding size.

    A single tensor is accepted for single-encoder models (SD 1.x/2.x, the toy model).
    """
    items = [embeddings] if torch.is_tensor(embeddings) else list(embeddings)
    dims = [input_embedding_matrix(model, k).shape[1] for k in range(len(model.text_encoders))]
    if len(items) != len(dims) or any(item.shape[-1] != dim for item, dim in zip(items, dims)):
        given = [tuple(item.shape) for item in items]
        raise ErasekitError(
            f"{what} of shapes {given} do not fit this model's {len(dims)} text encoder(s) of embedding sizes {dims}; "
            "give one (..., dim) tensor per text encoder, in the order of model.text_encoders"
        )
    return items


def tensors_per_encoder(name: str, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors to save, one per text encoder: ``name`` for the first, ``name_2`` for the second (diffusers' naming)."""
    return {name if k == 0 else f"{name}_{k + 1}": tensor for k, tensor in enumerate(tensors)}


def _special_ids(model) -> tuple[list[int], int, int]:
    """(ids before the words, the id closing them, the padding id) of the model's tokenizer."""
    tokenizer = model.tokenizer
    empty = tokenizer("")["input_ids"]
    if len(empty) < 2:
        raise ErasekitError("the tokenizer adds no begin/end tokens; erasekit's token attacks need a CLIP or BERT tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else empty[-1]
    return list(empty[:-1]), int(empty[-1]), int(pad)


def word_ids(model, text: str) -> list[int]:
    """Token ids of ``text`` without begin/end tokens."""
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def token_template(
    model,
    prompt: str = "",
    *,
    prefix: int = 0,
    insert_every: int = 0,
    replace_word: str | None = None,
) -> TokenTemplate:
    """Lay out ``prompt`` with slots: ``prefix`` slots before its words, one slot after every
    ``insert_every`` of its tokens (P4D-K), and/or its last occurrence of ``replace_word`` replaced
    by one slot (textual inversion; a prefix slot when the word does not occur).
    """
    check_shared_vocabulary(model)
    begin, end, pad = _special_ids(model)
    words = word_ids(model, prompt)
    placeholder = begin[0]  # any id works: the slot's embedding replaces it
    body: list[int] = []
    slots_in_body: list[int] = []
    if replace_word is not None:
        target = word_ids(model, replace_word)
        found = None
        for start in range(len(words) - len(target), -1, -1):
            if target and words[start : start + len(target)] == target:
                found = start
                break
        if found is None:
            prefix += 1
        else:
            words = words[:found] + [placeholder] + words[found + len(target) :]
            slots_in_body.append(found)
    if insert_every > 0:
        expanded, slots_in_body_new = [], []
        for index, token in enumerate(words):
            if index in slots_in_body:
                slots_in_body_new.append(len(expanded))
            expanded.append(token)
            if (index + 1) % insert_every == 0:
                slots_in_body_new.append(len(expanded))
                expanded.append(placeholder)
        words, slots_in_body = expanded, sorted(slots_in_body_new)
    body = [placeholder] * prefix + words
    slots = [len(begin) + i for i in range(prefix)] + [len(begin) + prefix + i for i in slots_in_body]
    ids = begin + body + [end]
    if len(ids) > model.max_length:
        raise ErasekitError(
            f"{prompt!r} with {len(slots)} attack tokens is {len(ids)} tokens, more than the text encoder's "
            f"{model.max_length}; use fewer attack tokens or a shorter prompt"
        )
    mask = [1] * len(ids) + [0] * (model.max_length - len(ids))
    ids = ids + [pad] * (model.max_length - len(ids))
    return TokenTemplate(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long), sorted(slots))


@contextmanager
def replaced_input_embeddings(encoder, slots: list[int], values: torch.Tensor):
    """Within the block, the encoder's input embeddings at ``slots`` are ``values`` ((batch,) k, dim)."""
    embedding = encoder.get_input_embeddings()

    def hook(module, inputs, output):
        output = output.clone()
        output[:, slots] = values.to(output.dtype)
        return output

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Conditioning:
    """The UNet conditioning of token ids (batch, tokens), gradients enabled (as ``model.encode`` does it)."""
    if input_ids.ndim == 1:
        input_ids = input_ids.unsqueeze(0)
    if attention_mask is not None and attention_mask.ndim == 1:
        attention_mask = attention_mask.unsqueeze(0)
    ids = input_ids.to(model.device)
    if model.kind == "toy":
        if attention_mask is None:
            attention_mask = (ids != model.tokenizer.pad_token_id).long()
        states = model.text_encoders[0](
            input_ids=ids, attention_mask=attention_mask.to(model.device), token_type_ids=torch.zeros_like(ids)
        ).last_hidden_state
        return Conditioning(states.to(model.dtype))
    if model.kind == "sd":
        return Conditioning(model.text_encoders[0](ids)[0].to(model.dtype))
    if model.kind == "sdxl":
        # both tokenizers share CLIP's vocabulary; only the padding id differs
        states, pooled = [], None
        for index, encoder in enumerate(model.text_encoders):
            encoder_ids = ids.clone()
            if attention_mask is not None:
                encoder_ids[attention_mask.to(ids.device) == 0] = model.tokenizers[index].pad_token_id
            out = encoder(encoder_ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        side = model.resolution
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], device=model.device).repeat(ids.shape[0], 1)
        added = {"text_embeds": pooled.to(model.dtype), "time_ids": time_ids.to(model.dtype)}
        return Conditioning(torch.cat(states, dim=-1).to(model.dtype), added)
    raise ErasekitError(f"unknown model kind {model.kind!r}")


def encode_slots(model, template: TokenTemplate, slot_embeddings) -> Conditioning:
    """The conditioning of ``template`` with its slots' input embeddings set to ``slot_embeddings``.

    ``slot_embeddings`` is (slots, dim) or (batch, slots, dim), or a list of those with one per text
    encoder (SDXL: dims 768 and 1280); gradients flow back to every one of them, through the token
    states and, on SDXL, through the pooled ``text_embeds`` of ``text_encoder_2``.
    """
    items = per_encoder(model, slot_embeddings)
    for item in items:
        if item.ndim not in (2, 3) or item.shape[-2] != len(template.slots):
            raise ErasekitError(
                f"embeddings of shape {tuple(item.shape)} for {len(template.slots)} slots; give (slots, dim) or (batch, slots, dim)"
            )
    batch = max(item.shape[0] if item.ndim == 3 else 1 for item in items)
    ids = template.input_ids.unsqueeze(0).repeat(batch, 1)
    mask = template.attention_mask.unsqueeze(0).repeat(batch, 1)
    with ExitStack() as stack:
        for encoder, item in zip(model.text_encoders, items):
            stack.enter_context(replaced_input_embeddings(encoder, template.slots, item))
        return encode_ids(model, ids, mask)


def candidate_token_ids(model) -> torch.Tensor:
    """Token ids an attack may use: the vocabulary less special and unused tokens."""
    tokenizer = model.tokenizer
    special = set(tokenizer.all_special_ids)
    vocabulary = tokenizer.get_vocab()
    keep = [i for token, i in vocabulary.items() if i not in special and not token.startswith("[unused")]
    size = min(input_embedding_matrix(model, k).shape[0] for k in range(len(model.text_encoders)))
    return torch.tensor(sorted(i for i in keep if i < size), dtype=torch.long)


class TokenProjector:
    """Nearest (L2) vocabulary token of embeddings, with the candidate rows and their norms computed once.

    ``||e - w||² = ||e||² - 2 e·w + ||w||²``: one matrix product per call, fast enough to run in
    every optimisation step (PEZ-style projected gradients).

    With several text encoders (SDXL) a slot has one embedding per encoder and gets one id for all
    of them (the vocabulary is shared): the id minimising ``Σ_k ||e_k - w_k||² / s_k²``, where ``s_k²``
    is the mean squared row norm of encoder k's table relative to encoder 0's, so each encoder counts
    alike whatever the scale of its table. Given a tensor it works on encoder 0 alone, as before;
    given a list (one tensor per encoder) it works on all and ``straight_through`` returns a list.
    """

    def __init__(self, model, candidates: torch.Tensor | None = None):
        check_shared_vocabulary(model)
        self.matrices = [input_embedding_matrix(model, k).detach() for k in range(len(model.text_encoders))]
        self.matrix = self.matrices[0]
        self.candidates = (candidate_token_ids(model) if candidates is None else candidates).to(self.matrix.device)
        self.rows = [matrix[self.candidates].float() for matrix in self.matrices]
        self.row_norms = [rows.square().sum(dim=1) for rows in self.rows]
        self.weights = [float(self.row_norms[0].mean() / norms.mean()) for norms in self.row_norms]  # 1.0 for encoder 0

    def __call__(self, embeddings) -> torch.Tensor:
        items = list(embeddings) if isinstance(embeddings, (list, tuple)) else [embeddings]
        if len(items) > len(self.rows):
            raise ErasekitError(f"{len(items)} embedding tensors for {len(self.rows)} text encoders; give one per encoder")
        distances = None
        for item, rows, norms, weight in zip(items, self.rows, self.row_norms, self.weights):
            flat = item.detach().reshape(-1, item.shape[-1]).to(rows.device, torch.float32)
            part = norms.unsqueeze(0) - 2 * flat @ rows.T  # ||e||² is the same for every row
            distances = part if distances is None else distances + weight * part
        return self.candidates[distances.argmin(dim=1)].reshape(items[0].shape[:-1])

    def straight_through(self, embeddings):
        """PEZ's projected forward pass: (the nearest tokens' embeddings, with the gradient passed to ``embeddings``; their ids).

        ``embeddings`` is a tensor, or a list with one per text encoder (a list of projections comes back).
        """
        ids = self(embeddings)
        if not isinstance(embeddings, (list, tuple)):
            projected = self.matrix[ids].detach().to(embeddings.dtype)
            return embeddings + (projected - embeddings).detach(), ids
        passed = []
        for item, matrix in zip(embeddings, self.matrices):
            projected = matrix[ids].detach().to(item.dtype)
            passed.append(item + (projected - item).detach())
        return passed, ids


def project_to_tokens(model, embeddings, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The nearest (L2) vocabulary token of each embedding (..., dim) -> ids (...); a list: one tensor per text encoder."""
    return TokenProjector(model, candidates)(embeddings)


def ids_to_text(model, ids) -> str:
    """Readable text of token ids (special tokens dropped)."""
    if torch.is_tensor(ids):
        ids = ids.tolist()
    return model.tokenizer.decode(ids, skip_special_tokens=True).strip()


def template_text(model, template: TokenTemplate) -> str:
    """The readable prompt of a template whose slots hold real ids (placeholders show as the begin token)."""
    ids = template.input_ids[template.attention_mask.bool()].tolist()
    return ids_to_text(model, ids)


def token_embeddings(model, ids) -> list[torch.Tensor]:
    """Every text encoder's input embeddings of token ids: float copies (..., dim_k), one per encoder."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    matrices = [input_embedding_matrix(model, k) for k in range(len(model.text_encoders))]
    return [matrix[ids.to(matrix.device)].detach().float().clone() for matrix in matrices]


def random_token_embeddings(model, count: int, candidates: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
    """Input embeddings of ``count`` random candidate tokens (a start point for optimised tokens):
    one (count, dim_k) tensor per text encoder, all of the same tokens."""
    picks = candidates[torch.randint(len(candidates), (count,), generator=generator)]
    return token_embeddings(model, picks)
