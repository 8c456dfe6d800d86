"""One composable cross-attention processor, so that erasures which hook into attention stack.

diffusers lets each ``Attention`` module use a processor object (``attn.set_processor``).
erasekit installs :class:`HookedCrossAttnProcessor` on cross-attention layers that need it;
the processor computes standard attention and calls named hooks at three points:

* ``kv_hooks[name](attn, text_states, key, value) -> (key, value)``: change the key/value
  projections' outputs (CPE's residual attention gates add ``ResAG(E)`` here);
* ``probs_hooks[name](attn, probs)``: see the attention probabilities, shape
  (batch, heads, queries, tokens) (Receler's concept mask is built from these);
* ``output_hooks[name](attn, out) -> out``: change the attention output ``o`` after
  ``to_out`` and before the block's residual add, so the block computes ``x + out`` (Receler's
  eraser returns ``o + E(o)`` here).

Several erasures add hooks under their own names; :func:`remove_hooks` takes one name off
every layer and puts the layer's original processor back when no hook is left, so removing
the last erasure restores the model exactly.

Attention probabilities are only materialised when a ``probs_hook`` is present; otherwise the
processor uses ``scaled_dot_product_attention`` like diffusers' default.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


class HookedCrossAttnProcessor:
    """Standard (cross-)attention with named kv, probability and output hooks."""

    def __init__(self, original_processor):
        self.original_processor = original_processor
        self.kv_hooks: dict[str, Callable] = {}
        self.probs_hooks: dict[str, Callable] = {}
        self.output_hooks: dict[str, Callable] = {}

    @property
    def empty(self) -> bool:
        return not (self.kv_hooks or self.probs_hooks or self.output_hooks)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        for hook in self.kv_hooks.values():
            key, value = hook(attn, encoder_hidden_states, key, value)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.probs_hooks:
            scores = query @ key.transpose(-1, -2) * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            for hook in self.probs_hooks.values():
                hook(attn, probs)
            out = probs @ value
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        for hook in self.output_hooks.values():
            out = hook(attn, out)

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def hooked_processor(attn) -> HookedCrossAttnProcessor:
    """The layer's hooked processor, installing one (and keeping the original) if needed."""
    processor = attn.processor
    if not isinstance(processor, HookedCrossAttnProcessor):
        processor = HookedCrossAttnProcessor(processor)
        attn.set_processor(processor)
    return processor


def remove_hooks(layers: dict[str, torch.nn.Module], name: str) -> None:
    """Take hook ``name`` off every layer; restore a layer's original processor once it has no hooks."""
    for attn in layers.values():
        processor = attn.processor
        if not isinstance(processor, HookedCrossAttnProcessor):
            continue
        for hooks in (processor.kv_hooks, processor.probs_hooks, processor.output_hooks):
            hooks.pop(name, None)
        if processor.empty:
            attn.set_processor(processor.original_processor)
