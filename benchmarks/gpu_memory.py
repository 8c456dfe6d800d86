"""Memory each method needs on SD 1.4 (512 px) and SDXL (1024 px): an estimate, from shapes alone.

``python benchmarks/gpu.py --estimate-memory`` runs this on a CPU in seconds. Nothing is computed: the
models are built on PyTorch's ``meta`` device (shapes, no values) from the real configs of
``gpu_configs.py``, and one training forward pass is traced for the tensors autograd keeps for the
backward pass (``torch.autograd.graph.saved_tensors_hooks``). Attention is counted as a fused kernel
keeps it (query, key, value, output and the log-sum-exp; not the attention matrix), which is what
PyTorch's ``scaled_dot_product_attention`` does on a GPU. Parameters kept for the backward pass are
counted once, with the weights.

Per method, batch 1 (the paper presets):

* weights: every pipeline module the CLI loads on the device (UNet, text encoder(s), VAE), float32;
* training state: ESD keeps the trained subset's original values beside a float32 copy, its gradient
  and Adam's two moments (4 x the subset); Receler's erasers and CPE's gates are small;
* activations: the traced saved tensors of the UNet pass that backpropagates (ESD-x: gradients for the
  attn2 weights; Receler: to the text conditioning, as its attack steps do). With ``bf16`` autocast they
  are taken as half; with gradient checkpointing as the checkpointed blocks' inputs plus the largest
  block's own activations (recomputed one block at a time) plus what lies outside the checkpointed blocks;
* closed-form methods (UCE, RECE) and CPE: weights, copies of the K/V matrices (and their deltas), float64
  d x d systems, CPE's text states of its templates and anchors (float32).

These are estimates (allocator overhead, the no-grad sampling passes and temporary buffers come on top,
typically 10-20 %); ``benchmarks/gpu.py`` measures the real peaks on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_configs import REAL

GIB = 2**30
RESOLUTION = {"sd14": 512, "sdxl": 1024}
TEXT_DIM = {"sd14": 768, "sdxl": 2048}


class _FusedAttention(torch.autograd.Function):
    """Shapes of a fused attention kernel: it keeps q, k, v, its output and one log-sum-exp per query row."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1]))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace stops at the forward pass
        raise NotImplementedError


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    return _FusedAttention.apply(query, key, value)


def build_meta(kind: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = REAL[kind]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        encoders = [CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))]
        if "text_encoder_2" in configs:
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])))
    return unet, vae, encoders


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def trace_saved(unet, kind: str, trained: str, checkpointed_types=("ResnetBlock2D", "BasicTransformerBlock")) -> dict:
    """Bytes autograd keeps for one batch-1 float32 forward pass; per checkpointable block too.

    ``trained``: "xattn" (gradients for attn2's parameters) or "conditioning" (for the text states only).
    """
    unet.requires_grad_(False)
    parameters = {id(p) for p in unet.parameters()}
    if trained == "xattn":
        for name, p in unet.named_parameters():
            p.requires_grad_("attn2" in name.split("."))
    side = RESOLUTION[kind] // 8
    sample = torch.empty(1, 4, side, side, device="meta")
    states = torch.empty(1, 77, TEXT_DIM[kind], device="meta", requires_grad=trained == "conditioning")
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.empty(1, 1280, device="meta"), "time_ids": torch.empty(1, 6, device="meta")}
    seen: set[int] = set()
    total = {"bytes": 0}

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in parameters and id(base) not in seen:
            seen.add(id(base))
            total["bytes"] += base.numel() * base.element_size()
        return tensor

    blocks, marks = [], {}

    def before(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
        marks[id(module)] = (total["bytes"], hidden.numel() * hidden.element_size())

    def after(module, args, kwargs, output):
        start, inputs = marks.pop(id(module))
        blocks.append({"saved": total["bytes"] - start, "input": inputs})

    handles = []
    for module in unet.modules():
        if type(module).__name__ in checkpointed_types:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(sample, torch.tensor([500], device="meta"), encoder_hidden_states=states, added_cond_kwargs=added)
    finally:
        F.scaled_dot_product_attention = original
        for handle in handles:
            handle.remove()
        unet.requires_grad_(False)
    inside = sum(b["saved"] for b in blocks)
    checkpointed = total["bytes"] - inside + sum(b["input"] for b in blocks) + max(b["saved"] for b in blocks)
    return {"saved": total["bytes"], "checkpointed": checkpointed}


def estimate(kind: str) -> list[dict]:
    from erasekit.methods.esd import select_parameters
    from erasekit.methods.receler import eraser_parameter_count
    from erasekit.targets import resolve_sd_targets

    unet, vae, encoders = build_meta(kind)
    n_unet, n_vae, n_text = count(unet), count(vae), sum(count(e) for e in encoders)
    weights = 4 * (n_unet + n_vae + n_text)
    xattn = select_parameters(unet, "xattn")
    params = dict(unet.named_parameters())
    n_xattn = sum(params[name].numel() for name in xattn)
    n_noxattn = sum(params[name].numel() for name in select_parameters(unet, "noxattn"))
    esd_trace = trace_saved(unet, kind, "xattn")
    receler_trace = trace_saved(unet, kind, "conditioning")
    dims = [m.to_out[0].out_features for n, m in unet.named_modules() if n.endswith("attn2")]
    eraser_values = eraser_parameter_count(dims, 128)
    kv = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    kv_values = sum(m.to_k.weight.numel() + m.to_v.weight.numel() for m in kv)
    d = TEXT_DIM[kind]
    target = resolve_sd_targets(["Taylor Swift"], kind="person")[0]
    anchor_prompts = (len(target.anchors) + 50) * (len(target.templates) if target.anchors_in_templates else 1)
    cpe_states = 4 * 77 * d * (anchor_prompts + 2 * len(target.templates))

    def row(method, setting, training_state, activations, note):
        total = weights + training_state + activations
        return {"model": kind, "method": method, "setting": setting, "weights_gib": weights / GIB,
                "training_state_gib": training_state / GIB, "activations_gib": activations / GIB, "total_gib": total / GIB,
                "note": note}

    state_x, state_u = 4 * 4 * n_xattn, 4 * 4 * n_noxattn
    erasers = 4 * 4 * eraser_values
    return [
        row("esd", "paper: ESD-x, fp32", state_x, esd_trace["saved"], "original + trained copy, gradient, Adam of attn2"),
        row("esd", "ESD-x, bf16 + ckpt", state_x, esd_trace["checkpointed"] / 2, "activations halved by autocast"),
        row("esd", "ESD-u (noxattn), fp32", state_u, esd_trace["saved"], "4 x the 86-90 % of the UNet it trains"),
        row("esd", "ESD-u, bf16 + ckpt", state_u, esd_trace["checkpointed"] / 2, ""),
        row("receler", "paper: fp32", erasers, receler_trace["saved"], "erasers r=128; backprop to the text states"),
        row("receler", "bf16 + ckpt", erasers, receler_trace["checkpointed"] / 2, ""),
        row("cpe", "paper", 4 * kv_values, cpe_states, f"no UNet pass; ~{anchor_prompts:,} anchor prompts' text states"),
        row("uce", "paper", 2 * 4 * kv_values, 8 * 4 * d * d, "K/V copies and deltas; float64 d x d solves"),
        row("rece", "paper", 2 * 4 * kv_values, 8 * 6 * d * d, "as UCE, a few more d x d matrices"),
    ]


def table(rows: list[dict]) -> str:
    lines = ["| model | method | setting | weights | training state | activations | total (estimate) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['setting']} | {r['weights_gib']:.1f} | {r['training_state_gib']:.2f} | "
                     f"{r['activations_gib']:.1f} | ~{r['total_gib']:.0f} GiB |")
    return "\n".join(lines)


def main(models: list[str], json_path: str | None = None) -> int:
    rows = [r for kind in models for r in estimate(kind.strip())]
    print(table(rows))
    print("\nGiB; estimates from parameter counts and traced saved activations (batch 1, 512 px / 1024 px), "
          "not measurements: benchmarks/gpu.py measures the peaks on a GPU")
    if json_path:
        Path(json_path).write_text(json.dumps({"estimate": True, "rows": rows}, indent=1))
    return 0
