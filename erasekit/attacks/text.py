"""Text-encoder utilities for token-space attacks: encode with learnable token embeddings, project to tokens.

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

SDXL has two text encoders with different embedding sizes: :func:`encode_ids` supports it
(hard prompts), slot embeddings and projection do not (a clear :class:`ErasekitError`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

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


def _require_single_encoder(model, what: str) -> None:
    if model.kind == "sdxl":
        raise ErasekitError(
            f"{what} is not supported for SDXL (two text encoders with different embedding sizes); "
            "use an SD 1.x/2.x or the toy model, or an attack that works on prompts or conditioning"
        )


def input_embedding_matrix(model, encoder_index: int = 0) -> torch.Tensor:
    """The text encoder's input token-embedding matrix (vocabulary, dim); a view, not a copy."""
    return model.text_encoders[encoder_index].get_input_embeddings().weight


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


def encode_slots(model, template: TokenTemplate, slot_embeddings: torch.Tensor) -> Conditioning:
    """The conditioning of ``template`` with its slots' input embeddings set to ``slot_embeddings``.

    ``slot_embeddings`` is (slots, dim) or (batch, slots, dim); gradients flow back to it.
    """
    _require_single_encoder(model, "encoding with learnable token embeddings")
    if slot_embeddings.shape[-2] != len(template.slots):
        raise ErasekitError(f"{slot_embeddings.shape[-2]} embeddings for {len(template.slots)} slots; give one per slot")
    batch = slot_embeddings.shape[0] if slot_embeddings.ndim == 3 else 1
    ids = template.input_ids.unsqueeze(0).repeat(batch, 1)
    mask = template.attention_mask.unsqueeze(0).repeat(batch, 1)
    with replaced_input_embeddings(model.text_encoders[0], template.slots, slot_embeddings):
        return encode_ids(model, ids, mask)


def candidate_token_ids(model) -> torch.Tensor:
    """Token ids an attack may use: the vocabulary less special and unused tokens."""
    tokenizer = model.tokenizer
    special = set(tokenizer.all_special_ids)
    vocabulary = tokenizer.get_vocab()
    keep = [i for token, i in vocabulary.items() if i not in special and not token.startswith("[unused")]
    size = input_embedding_matrix(model).shape[0]
    return torch.tensor(sorted(i for i in keep if i < size), dtype=torch.long)


class TokenProjector:
    """Nearest (L2) vocabulary token of embeddings, with the candidate rows and their norms computed once.

    ``||e - w||² = ||e||² - 2 e·w + ||w||²``: one matrix product per call, fast enough to run in
    every optimisation step (PEZ-style projected gradients).
    """

    def __init__(self, model, candidates: torch.Tensor | None = None):
        _require_single_encoder(model, "projecting embeddings to tokens")
        matrix = input_embedding_matrix(model).detach()
        self.candidates = (candidate_token_ids(model) if candidates is None else candidates).to(matrix.device)
        self.rows = matrix[self.candidates].float()
        self.row_norms = self.rows.square().sum(dim=1)
        self.matrix = matrix

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        flat = embeddings.detach().reshape(-1, embeddings.shape[-1]).to(self.rows.device, torch.float32)
        distances = self.row_norms.unsqueeze(0) - 2 * flat @ self.rows.T  # ||e||² is the same for every row
        return self.candidates[distances.argmin(dim=1)].reshape(embeddings.shape[:-1])

    def straight_through(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PEZ's projected forward pass: (the nearest tokens' embeddings, with the gradient passed to ``embeddings``; their ids)."""
        ids = self(embeddings)
        projected = self.matrix[ids].detach().to(embeddings.dtype)
        return embeddings + (projected - embeddings).detach(), ids


def project_to_tokens(model, embeddings: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The nearest (L2) vocabulary token of each embedding (..., dim) -> ids (...)."""
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


def random_token_embeddings(model, count: int, candidates: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Input embeddings of ``count`` random candidate tokens (a start point for optimised tokens)."""
    picks = candidates[torch.randint(len(candidates), (count,), generator=generator)]
    return input_embedding_matrix(model)[picks].detach().float().clone()
