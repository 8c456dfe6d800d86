"""The Stable Diffusion 1.4-shaped model every benchmark times: its real UNet config, random weights.

Nothing is downloaded: the UNet is built from CompVis/stable-diffusion-v1-4's ``unet/config.json``
values (block_out_channels 320/640/1280/1280, cross_attention_dim 768, attention_head_dim 8,
2 layers per block: 16 cross-attention layers, 32 to_k/to_v matrices) and its text encoder is
replaced by random 77 x 768 states, one fixed draw per prompt.
"""

from __future__ import annotations

import torch

from erasekit.models.handle import Conditioning, ModelHandle

# CompVis/stable-diffusion-v1-4, unet/config.json
SD14_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
# CompVis/stable-diffusion-v1-4, scheduler/scheduler_config.json (as a DDIM schedule)
SD14_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1,
)
TOKENS, DIM = 77, 768  # CLIP ViT-L/14's text states


class RandomTextSD(ModelHandle):
    """An SD 1.x handle whose 'text encoder' gives random 77 x 768 states (one fixed draw per prompt)."""

    @property
    def vae_scale_factor(self) -> int:
        return 8

    def encode(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        states = [torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(len(p) * 7919 + sum(map(ord, p))))
                  for p in prompts]
        return Conditioning(torch.stack(states).to(self.device, self.dtype))

    def token_positions(self, prompt, word):
        return list(range(1, 1 + len(word.split())))  # BOS at 0, one token per word


def sd14_unet(device: str = "cpu"):
    """SD 1.4's UNet with random weights (seed 0), frozen, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(**SD14_UNET_CONFIG).to(device).eval().requires_grad_(False)


def sd14_shaped_model(device: str = "cpu", with_scheduler: bool = True) -> RandomTextSD:
    """A :class:`RandomTextSD` around :func:`sd14_unet`, with SD 1.4's schedule as DDIM."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD14_SCHEDULER_CONFIG) if with_scheduler else None
    return RandomTextSD(kind="sd", name="sd14-shaped-random", unet=sd14_unet(device), scheduler=scheduler,
                        tokenizers=[], text_encoders=[])
