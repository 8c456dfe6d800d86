"""Erasures that travel: :func:`export` writes what other tools load, :func:`apply` puts an erasure on a plain
diffusers pipeline.

Formats (:data:`FORMATS`):

* ``diffusers``: the model folder with every weight-delta erasure merged (safetensors only). Module
  erasures (Receler, CPE) have no place in diffusers' weights: they are written beside the model, in
  ``erasures/``, for :func:`apply`.
* ``lora``: one ``.safetensors`` of diffusers/peft LoRA layers that ``pipe.load_lora_weights`` loads:
  ``unet.<module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r); for a convolution A is
  (r, in, kh, kw) and B (out, r, 1, 1). The summed delta of a weight, ΔW = U S Vᵀ, is split as
  B = U_r S_r^½, A = S_r^½ V_rᵀ. It is exact at r = the numerical rank of ΔW (singular values above
  σ₁·max(m, n)·ε_float32): a UCE edit ΔW = s_e W (G − C) Cᵀ M⁻¹ has rank at most the number of erased
  token rows (the columns of C; ``info["erase_rows"]``), a RECE edit W⁰(S − I) at most those plus, per
  round, its adversarial and retain rows. ``rank`` keeps the r largest singular values; the relative error
  ‖ΔW − BA‖_F / ‖ΔW‖_F = (Σ_{i>r} σᵢ²)^½ / (Σ σᵢ²)^½ is reported. Every module gets the largest rank
  used (zero-padded), so that alpha = rank and the LoRA scale is 1 in any diffusers version.
  Deltas of biases and norms (ESD) have no LoRA form: they are refused, or left out with
  ``approximate=True``.
* ``single-file``: one ``.safetensors`` checkpoint in the original layout, for AUTOMATIC1111, ComfyUI
  and diffusers' ``from_single_file`` (:mod:`erasekit.models.single_file`).
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erasekit.erasure import Erasure, parameter_signature
from erasekit.errors import ErasekitError
from erasekit.models.handle import TEXT_ENCODER_PREFIXES, ModelHandle
from erasekit.models.loading import handle_from_pipeline, load_model
from erasekit.utils import atomic_folder, check_writable, save_safetensors

FORMATS = ("diffusers", "lora", "single-file")
_EPS = torch.finfo(torch.float32).eps


@dataclass
class ExportResult:
    """What :func:`export` wrote, and what to tell the user about it (one line each)."""

    path: Path
    format: str
    lines: list[str] = field(default_factory=list)
    rank: int | None = None  # lora: the rank written
    max_error: float | None = None  # lora: the largest relative reconstruction error of one delta


# ----------------------------------------------------------------------------- checks
def _loaded(erasures) -> list[Erasure]:
    if isinstance(erasures, (str, Path, Erasure)):
        erasures = [erasures]
    return [item if isinstance(item, Erasure) else Erasure.load(item) for item in erasures]


def _lora_shaped(name: str, delta: torch.Tensor) -> bool:
    """Whether a delta can be a LoRA layer: the weight of a Linear (2-D) or a convolution (4-D)."""
    return name.endswith(".weight") and delta.ndim in (2, 4)


def check_export(erasures: list[Erasure], format: str, out, rank: int | None = None, approximate: bool = False,
                 overwrite: bool = False) -> Path:
    """Every check that needs no model, before any work; returns the path that will be written."""
    if format not in FORMATS:
        raise ErasekitError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    if rank is not None and format != "lora":
        raise ErasekitError("--rank is for --format lora; leave it out")
    if approximate and format != "lora":
        raise ErasekitError("--approximate is for --format lora; leave it out")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ErasekitError(f"rank {rank!r} is not a whole number of at least 1")
    for erasure in erasures:
        if erasure.modules and format != "diffusers":
            raise ErasekitError(
                f"the {erasure.method} erasure adds modules, which a {format} file cannot hold; export --format diffusers "
                "(it writes the model folder and the erasure beside it) and attach it with erasekit.apply(pipe, FILE)")
    if format == "lora":
        if not any(e.deltas for e in erasures):
            raise ErasekitError("a LoRA holds weight deltas: pass an ESD, UCE or RECE erasure with --erasure")
        text = sorted({n for e in erasures for n in e.deltas if n.startswith(TEXT_ENCODER_PREFIXES)})
        if text:
            raise ErasekitError(
                f"the erasure changes the text encoder ({text[0]}, ...), and erasekit writes UNet LoRAs only; export "
                "--format diffusers or single-file (exact)")
        unsupported = sorted({n for e in erasures for n, d in e.deltas.items() if not _lora_shaped(n, d)})
        if unsupported and not approximate:
            raise ErasekitError(
                f"the erasure changes {len(unsupported)} bias or norm tensor(s) (e.g. {unsupported[0]}), which a LoRA cannot "
                "hold; export --format single-file or diffusers (exact), or pass --approximate to leave them out")
    out = Path(out).expanduser()
    if format != "diffusers":
        out = Erasure.file_path(out)
    if out.exists() and not overwrite:
        raise ErasekitError(f"{out} already exists; pass --overwrite or choose another --out")
    check_writable(out, folder=format == "diffusers")
    return out


# ----------------------------------------------------------------------------- export
def export(model, erasures=(), out=None, format: str = "diffusers", *, rank: int | None = None, approximate: bool = False,
           overwrite: bool = False, force: bool = False) -> ExportResult:
    """Write ``model`` with ``erasures`` (paths or :class:`Erasure`) in ``format`` at ``out``.

    ``model`` is a :class:`ModelHandle` without applied erasures, a diffusers pipeline, or what
    :func:`erasekit.load_model` takes. The erasures are applied for the export and taken off after it,
    so the model is left as it was. See the module docstring for the formats, ``rank`` and ``approximate``.
    """
    if out is None:
        raise ErasekitError("pass out, the file or folder to write")
    erasures = _loaded(erasures)
    out = check_export(erasures, format, out, rank, approximate, overwrite)
    model = _as_model(model)
    if model.applied_erasures:
        raise ErasekitError("the model already has erasures applied; pass the base model and list every erasure to export")
    if format == "single-file" and model.kind == "toy":
        raise ErasekitError("the toy model has no single-file layout; export it with --format diffusers")
    if model.kind == "toy" and any(n.startswith(TEXT_ENCODER_PREFIXES) for e in erasures for n in e.deltas):
        raise ErasekitError("a toy model folder holds the UNet only (its text encoder is the packaged MiniLM), so an erasure "
                            "that changes the text encoder cannot be exported with it; apply the erasure file instead")
    applied = []
    try:
        for erasure in erasures:
            applied.append(erasure.apply(model, force=force))
        if format == "diffusers":
            result = _write_diffusers(model, erasures, out)
        elif format == "lora":
            result = _write_lora(model, erasures, out, rank, approximate)
        else:
            result = _write_single_file(model, erasures, out)
    finally:
        for erasure in reversed(applied):
            erasure.remove(model)
    return result


def _as_model(model) -> ModelHandle:
    if isinstance(model, ModelHandle):
        return model
    if isinstance(model, (str, Path)):
        return load_model(model)
    return _handle_of(model)


def _summary(erasures: list[Erasure]) -> str:
    return ", ".join(f"{e.method} {e.concepts}" for e in erasures) or "none"


def _metadata(model, erasures: list[Erasure], **extra) -> dict[str, str]:
    entry = {"base_model": model.name, "erasures": [{"method": e.method, "concepts": e.concepts, "digest": e.digest}
                                                    for e in erasures], **extra}
    return {"erasekit_export": json.dumps(entry)}


def _model_bytes(model) -> int:
    modules = [model.unet, model.vae, *model.text_encoders]
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


def _write_diffusers(model, erasures: list[Erasure], out: Path) -> ExportResult:
    check_writable(out, folder=True, room=_model_bytes(model))
    merged = [e for e in erasures if e.deltas]
    shipped = [e for e in erasures if e.modules]
    lines = []
    with atomic_folder(out) as tmp:
        if model.kind == "toy":
            from erasekit.models.toy import write_toy_folder

            write_toy_folder(tmp, model.unet, extra={"max_length": model.max_length, "guidance": model.default_guidance,
                                                     "steps": model.default_steps})
        else:
            model.pipeline.save_pretrained(tmp, safe_serialization=True)
        for index, erasure in enumerate(shipped, 1):
            name = f"erasures/{index:02d}-{erasure.method}.safetensors"
            _resigned(erasure, model, out).save(tmp / name)
            lines.append(f"{out / name}: the {erasure.method} erasure {erasure.concepts} adds modules that no diffusers "
                         f"folder holds; attach it with erasekit.apply(pipe, {str(out / name)!r})")
    loader = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}.get(model.kind)
    how = f"{loader}.from_pretrained({str(out)!r})" if loader else f"erasekit.load_model({str(out)!r})"
    lines.insert(0, f"wrote {out}: a diffusers folder with {len(merged)} erasure(s) merged ({_summary(merged)}); load it "
                    f"with {how}")
    return ExportResult(out, "diffusers", lines)


def _resigned(erasure: Erasure, model, out: Path) -> Erasure:
    """The erasure with the exported weights as its base (they include the merged deltas, so the base check passes)."""
    parameters = model.weight_parameters()
    signature = {name: {"shape": list(parameters[name].shape), "values": parameter_signature(parameters[name])}
                 for name in erasure.base_signature if name in parameters}
    return dataclasses.replace(erasure, base_model=str(out), base_signature=signature)


def _write_single_file(model, erasures: list[Erasure], out: Path) -> ExportResult:
    from erasekit.models.single_file import layout_of, single_file_state_dict

    check_writable(out, room=_model_bytes(model))
    layout = layout_of(model.kind, dict(model.unet.config))
    state = single_file_state_dict(model.unet, model.vae, model.text_encoders, layout)
    state = {k: v.contiguous() for k, v in state.items()}
    save_safetensors(out, state, metadata=_metadata(model, erasures, layout=layout))
    loader = "StableDiffusionXLPipeline" if model.kind == "sdxl" else "StableDiffusionPipeline"
    return ExportResult(out, "single-file", [
        f"wrote {out}: a single-file {layout} checkpoint ({len(state)} tensors, {str(model.dtype).replace('torch.', '')}) "
        f"with {len(erasures)} erasure(s) merged ({_summary(erasures)})",
        f"load it as a checkpoint in AUTOMATIC1111 or ComfyUI, with erasekit.load_model({str(out)!r}), or with "
        f"{loader}.from_single_file({str(out)!r}, config=FOLDER)",
    ])


# ----------------------------------------------------------------------------- LoRA
def lora_factors(delta: torch.Tensor, rank: int | None = None):
    """(B (out, r), A (r, in·kh·kw), exact rank, relative error) of one weight delta; see the module docstring."""
    matrix = delta.detach().double().cpu().reshape(delta.shape[0], -1)
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return None, None, 0, 0.0
    exact = int((S > S[0] * max(matrix.shape) * _EPS).sum())
    r = exact if rank is None else min(rank, exact)
    error = float((S[r:].square().sum() / S.square().sum()).sqrt())
    root = S[:r].sqrt()
    return U[:, :r] * root, root[:, None] * Vh[:r], exact, error


def _write_lora(model, erasures: list[Erasure], out: Path, rank: int | None, approximate: bool) -> ExportResult:
    modules = dict(model.unet.named_modules())
    total: dict[str, torch.Tensor] = {}
    for erasure in erasures:
        for name, delta in erasure.deltas.items():
            total[name] = total.get(name, 0) + delta.double()
    kept, dropped = {}, {}
    for name, delta in total.items():
        module = modules.get(name.rpartition(".")[0])
        fits = _lora_shaped(name, delta) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
        (kept if fits else dropped)[name] = delta
    if dropped and not approximate:
        raise ErasekitError(f"the erasure changes {len(dropped)} tensor(s) that are no Linear or convolution weight (e.g. "
                            f"{sorted(dropped)[0]}), which a LoRA cannot hold; export --format single-file or diffusers, or pass "
                            "--approximate to leave them out")
    factors = {name: lora_factors(delta, rank) for name, delta in kept.items()}
    factors = {name: f for name, f in factors.items() if f[0] is not None}
    if not factors:
        raise ErasekitError("every weight delta of these erasures is zero, so the LoRA would change nothing")
    width = max(f[0].shape[1] for f in factors.values())
    tensors, delta_values, lora_values = {}, 0, 0
    for name, (B, A, _, _) in factors.items():
        delta = kept[name]
        B = torch.cat([B, B.new_zeros(B.shape[0], width - B.shape[1])], 1)
        A = torch.cat([A, A.new_zeros(width - A.shape[0], A.shape[1])], 0)
        if delta.ndim == 4:
            A, B = A.reshape(width, *delta.shape[1:]), B[:, :, None, None]
        module = name[: -len(".weight")]
        tensors[f"unet.{module}.lora_A.weight"] = A.float().contiguous()
        tensors[f"unet.{module}.lora_B.weight"] = B.float().contiguous()
        delta_values += delta.numel()
        lora_values += A.numel() + B.numel()
    errors = {name: f[3] for name, f in factors.items()}
    worst = max(errors, key=errors.get)
    exact_ranks = [f[2] for f in factors.values()]
    total_norm = sum(float(d.square().sum()) for d in total.values())
    kept_error = sum(errors[n] ** 2 * float(kept[n].square().sum()) for n in factors)
    dropped_norm = sum(float(d.square().sum()) for d in dropped.values())
    overall = ((kept_error + dropped_norm) / total_norm) ** 0.5 if total_norm else 0.0
    save_safetensors(out, tensors, metadata=_metadata(model, erasures, rank=width, max_relative_error=errors[worst],
                                                      relative_error=overall))
    lines = [f"wrote {out}: a LoRA of rank {width} on {len(factors)} UNet layers ({_summary(erasures)}); load it with "
             f"pipe.load_lora_weights({str(out)!r})"]
    if rank is None or rank >= max(exact_ranks):
        lines.append(f"exact: rank {width} holds every delta at its numerical rank (largest {max(exact_ranks)}); "
                     f"relative error at most {errors[worst]:.1e}, float32 rounding")
    else:
        cut = sum(r > rank for r in exact_ranks)
        lines.append(f"truncated: rank {rank} cuts {cut} of {len(factors)} deltas (exact needs rank {max(exact_ranks)}); "
                     f"relative error ‖ΔW − BA‖/‖ΔW‖ up to {errors[worst]:.2e} ({worst}), {overall:.2e} over all deltas")
    if dropped:
        lines.append(f"approximate: left out {len(dropped)} bias/norm delta(s) a LoRA cannot hold, "
                     f"{(dropped_norm / total_norm) ** 0.5:.2%} of the deltas' norm")
    if lora_values > delta_values:
        lines.append(f"note: this LoRA holds {lora_values:,} values, more than the {delta_values:,} of the deltas themselves; "
                     "pass --rank to truncate it, or export --format single-file for the exact model")
    return ExportResult(out, "lora", lines, rank=width, max_error=errors[worst])


# ----------------------------------------------------------------------------- plain pipelines
_HANDLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _handle_of(pipe) -> ModelHandle:
    """The handle erasekit keeps for a diffusers pipeline (made on first use), so that erasures stack and come off."""
    if isinstance(pipe, ModelHandle):
        return pipe
    handle = _HANDLES.get(pipe)
    if handle is None or handle.unet is not getattr(pipe, "unet", None):
        handle = handle_from_pipeline(pipe)
        _HANDLES[pipe] = handle
    return handle


def apply(pipe, erasure, scale: float = 1.0, force: bool = False) -> Erasure:
    """Apply an erasure (a path or :class:`Erasure`) to a plain diffusers StableDiffusionPipeline or
    StableDiffusionXLPipeline, in place; returns it, for :func:`remove`.

    The same code as on an erasekit model: weight deltas are added to the UNet, Receler's erasers and
    CPE's gates are attached to its cross-attention layers. This is how Receler and CPE erasures ship:
    the erasure file beside any diffusers model of its base.
    """
    erasure = erasure if isinstance(erasure, Erasure) else Erasure.load(erasure)
    return erasure.apply(_handle_of(pipe), scale=scale, force=force)


def remove(pipe, erasure: Erasure) -> None:
    """Take an erasure that :func:`apply` put on ``pipe`` off again (the original weights and processors, exactly)."""
    erasure.remove(_handle_of(pipe))
