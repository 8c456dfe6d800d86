"""The composable cross-attention processor: identical to diffusers' without hooks, hooks compose, removal restores."""

import torch
from diffusers import UNet2DConditionModel

from erasekit.models.attention import HookedCrossAttnProcessor, hooked_processor, remove_hooks
from erasekit.models.toy import toy_unet_config


def _unet_and_inputs():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**toy_unet_config()).eval()
    x = torch.randn(2, 3, 24, 24)
    text = torch.randn(2, 24, 384)
    return unet, x, text


def _cross_attention(unet):
    return {n: m for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False)}


@torch.no_grad()
def test_hooked_processor_matches_diffusers_and_removal_restores():
    unet, x, text = _unet_and_inputs()
    reference = unet(x, 500, encoder_hidden_states=text).sample
    layers = _cross_attention(unet)
    originals = {n: type(m.processor) for n, m in layers.items()}
    captured = []
    for attn in layers.values():
        hooked_processor(attn).probs_hooks["capture"] = lambda attn, probs: captured.append(probs.shape)
    hooked = unet(x, 500, encoder_hidden_states=text).sample
    assert torch.allclose(hooked, reference, atol=1e-5)
    assert len(captured) == len(layers) and all(s[-1] == 24 for s in captured)
    remove_hooks(layers, "capture")
    assert {n: type(m.processor) for n, m in layers.items()} == originals
    assert torch.equal(unet(x, 500, encoder_hidden_states=text).sample, reference)


@torch.no_grad()
def test_hooks_from_two_owners_compose_and_come_off_one_at_a_time():
    unet, x, text = _unet_and_inputs()
    reference = unet(x, 500, encoder_hidden_states=text).sample
    layers = _cross_attention(unet)
    for attn in layers.values():
        hooked_processor(attn).output_hooks["zero-out"] = lambda attn, out: out * 0
        hooked_processor(attn).kv_hooks["double-v"] = lambda attn, e, k, v: (k, 2 * v)
    both = unet(x, 500, encoder_hidden_states=text).sample
    assert not torch.allclose(both, reference, atol=1e-4)
    remove_hooks(layers, "zero-out")
    doubled = unet(x, 500, encoder_hidden_states=text).sample
    assert all(isinstance(m.processor, HookedCrossAttnProcessor) for m in layers.values())
    assert not torch.allclose(doubled, both, atol=1e-4) and not torch.allclose(doubled, reference, atol=1e-4)
    remove_hooks(layers, "double-v")
    assert torch.equal(unet(x, 500, encoder_hidden_states=text).sample, reference)
