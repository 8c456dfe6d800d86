"""Receler's erasers at inference: the eraser module, its saved form, and attach/detach on a model.

Each eraser is an output hook of one cross-attention layer (:mod:`erasekit.models.attention`),
keyed by the layer's full path; the block then computes ``x + o + scale * E(o)``. Training lives
in :mod:`erasekit.methods.receler`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from erasekit.errors import ErasekitError
from erasekit.models.attention import hooked_processor, remove_hooks


class Eraser(nn.Module):
    """E(o) = up(GELU(down(o))): Linear(dim -> rank), GELU, Linear(rank -> dim); ``up`` starts at zero."""

    def __init__(self, dim: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        with torch.no_grad():
            bound = 1 / math.sqrt(dim)  # torch's default Linear init, but from our generator (seeded)
            self.down.weight.copy_(torch.rand(rank, dim, generator=generator) * 2 * bound - bound)
            self.down.bias.copy_(torch.rand(rank, generator=generator) * 2 * bound - bound)
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(o)))


def eraser_state(erasers: dict[str, Eraser]) -> dict[str, torch.Tensor]:
    """Flat float32 CPU tensors ``<attention path>.{down,up}.{weight,bias}`` (an Erasure's ``modules``)."""
    return {
        f"{path}.{key}": value.detach().float().cpu().contiguous()
        for path, eraser in erasers.items() for key, value in eraser.state_dict().items()
    }


def erasers_from_state(modules: dict[str, torch.Tensor]) -> dict[str, Eraser]:
    """The inverse of :func:`eraser_state`."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in modules.items():
        if key.count(".") < 2:
            raise ErasekitError(f"this Receler erasure holds a tensor {key!r} that is no eraser's; the erasure file is damaged")
        path, layer, kind = key.rsplit(".", 2)
        grouped.setdefault(path, {})[f"{layer}.{kind}"] = value
    erasers = {}
    for path, state in grouped.items():
        if set(state) != {"down.weight", "down.bias", "up.weight", "up.bias"} or state["down.weight"].ndim != 2:
            raise ErasekitError(f"the Receler eraser for {path} is incomplete ({sorted(state)}); the erasure file is damaged")
        rank, dim = state["down.weight"].shape
        eraser = Eraser(dim, rank)
        try:
            eraser.load_state_dict({k: v.float() for k, v in state.items()})
        except RuntimeError:  # a tensor of the wrong shape
            raise ErasekitError(f"the Receler eraser for {path} has tensors of mismatched shapes; the erasure file is damaged") from None
        erasers[path] = eraser.requires_grad_(False).eval()
    return erasers


def hook_name(erasure) -> str:
    """The output-hook name of one applied Receler erasure."""
    return f"receler-{id(erasure)}"


def _inference_hook(eraser: Eraser, scale: float):
    def hook(attn, out):
        return out + scale * eraser(out.float()).to(out.dtype)

    return hook


class RecelerModules:
    """Puts a Receler erasure's erasers on a model (output hooks) and takes them off."""

    @staticmethod
    def attach(model, erasure, scale: float) -> None:
        erasers = erasers_from_state(erasure.modules)
        layers = model.cross_attention_layers()
        for path, eraser in erasers.items():  # check everything before touching the model
            if path not in layers:
                raise ErasekitError(
                    f"the model has no cross-attention layer {path!r}; this Receler erasure was made for another architecture"
                )
            width = layers[path].to_out[0].out_features
            if eraser.down.in_features != width:
                raise ErasekitError(
                    f"{path} is {width} wide in the model but {eraser.down.in_features} in this Receler erasure; "
                    "it was made for another architecture"
                )
        name = hook_name(erasure)
        for path, eraser in erasers.items():
            eraser.to(model.device)
            hooked_processor(layers[path]).output_hooks[name] = _inference_hook(eraser, scale)

    @staticmethod
    def detach(model, erasure) -> None:
        remove_hooks(model.cross_attention_layers(), hook_name(erasure))
