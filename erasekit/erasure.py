"""The Erasure artifact: what every method returns, saves, applies, stacks and removes.

On disk an erasure is **one ``.safetensors`` file**. Its tensors are

* ``delta.<parameter>``: a weight delta for a UNet parameter (ESD, UCE, RECE, adv) or a text-encoder
  one (``delta.text_encoder.<parameter>``, ``delta.text_encoder_2.``: adv's ``text-encoder`` set), and/or
* ``module.<name>``: the state of added modules (Receler's erasers, CPE's gates),

and its header metadata holds one JSON document under the key ``"erasekit"``::

    {"format": 1, "method": "uce", "concepts": ["triangle"], "base_model": "toy",
     "base_signature": {...}, "config": {...}, "module_type": null, "info": {...},
     "erasekit_version": "0.1.0"}

Nothing is ever unpickled: ``Erasure.load`` reads safetensors and JSON only.

An erasure is made for one base model. ``base_signature`` records, for the weights it
touches, their shape, sum of absolute values and a few sampled values; ``apply`` compares
them with the loaded model (tolerant to float16/bfloat16 rounding) and refuses a model
they do not match unless ``force=True``.

Stacking and removal are exact: the handle keeps the original value of every parameter
an applied erasure touches, and after ``remove`` each parameter is rebuilt as
original + the deltas of the erasures still applied (the original itself when none is).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from erasekit.errors import ErasekitError
from erasekit.modules import MODULE_ERASURES
from erasekit.utils import save_safetensors

FORMAT_VERSION = 1
MAX_VALUE = 1e4  # no erasure changes a weight (or holds a module value) by more; larger values mean a damaged file
_SIGNATURE_SAMPLES = 8
_SIGNATURE_MAX_PARAMETERS = 64


def _version() -> str:
    from erasekit.version import __version__

    return __version__


def parameter_signature(tensor: torch.Tensor) -> list[float]:
    """shape-independent summary: sum |w| and a few values at fixed positions (float64)."""
    flat = tensor.detach().reshape(-1).double().cpu()
    positions = torch.linspace(0, flat.numel() - 1, _SIGNATURE_SAMPLES).long()
    return [float(flat.abs().sum())] + flat[positions].tolist()


def model_signature(model, names: list[str]) -> dict[str, dict]:
    """Signatures of the named parameters (UNet, or ``text_encoder.``), from their original values (before any applied erasure)."""
    parameters = model.weight_parameters()
    signature = {}
    for name in sorted(names)[:_SIGNATURE_MAX_PARAMETERS]:
        if name not in parameters:
            raise ErasekitError(f"the model has no parameter {name!r}; this erasure was made for another architecture")
        value = model.original_parameters.get(name, parameters[name])
        signature[name] = {"shape": list(value.shape), "values": parameter_signature(value)}
    return signature


def _signature_mismatch(expected: dict, actual: dict) -> str | None:
    for name, entry in expected.items():
        got = actual.get(name)
        if got is None or got["shape"] != entry["shape"]:
            return f"{name} has shape {None if got is None else got['shape']}, expected {entry['shape']}"
        a, b = torch.tensor(got["values"]), torch.tensor(entry["values"])
        if not torch.allclose(a, b, rtol=2e-2, atol=2e-3):
            return f"{name} holds other values"
    return None


def _check_metadata(meta: dict) -> None:
    """Raise TypeError/KeyError, naming the field, when the header's JSON does not have the shape :meth:`Erasure.save` writes."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise TypeError(what)

    need(isinstance(meta.get("format", 1), int), "format is not a whole number")
    need(isinstance(meta.get("method"), str) and bool(meta["method"]), "method is not a name")
    need(isinstance(meta.get("concepts"), list) and all(isinstance(c, str) for c in meta["concepts"]), "concepts is not a list of text")
    need(isinstance(meta.get("base_model"), str), "base_model is not text")
    need(isinstance(meta.get("config"), dict), "config is not an object")
    need(meta.get("module_type") is None or isinstance(meta["module_type"], str), "module_type is not text")
    need(isinstance(meta.get("info") or {}, dict), "info is not an object")
    signature = meta.get("base_signature") or {}
    need(isinstance(signature, dict), "base_signature is not an object")
    for name, entry in signature.items():
        need(isinstance(entry, dict) and isinstance(entry.get("shape"), list) and isinstance(entry.get("values"), list)
             and all(isinstance(v, (int, float)) for v in entry["values"]) and all(isinstance(d, int) for d in entry["shape"]),
             f"base_signature[{name!r}] is not a shape and values")


@dataclass
class Erasure:
    """The result of erasing concepts from one base model. See the module docstring for the format."""

    method: str
    concepts: list[str]
    base_model: str
    config: dict
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, torch.Tensor] = field(default_factory=dict)
    module_type: str | None = None
    base_signature: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # timings, chosen epoch, anything worth keeping
    erasekit_version: str = field(default_factory=_version)

    # -------------------------------------------------------------- creation
    @classmethod
    def from_deltas(cls, model, method: str, concepts: list[str], config: dict, deltas: dict[str, torch.Tensor], info=None) -> "Erasure":
        """An erasure of weight deltas for named parameters (:meth:`ModelHandle.weight_parameters`; float32, on the CPU)."""
        deltas = {name: d.detach().float().cpu().contiguous() for name, d in deltas.items()}
        return cls(
            method=method, concepts=list(concepts), base_model=model.name, config=dict(config), deltas=deltas,
            base_signature=model_signature(model, list(deltas)), info=dict(info or {}),
        )

    @property
    def fingerprint(self) -> str:
        """A short id of the base weights this erasure was made for."""
        text = json.dumps({k: [round(v, 3) for v in e["values"][:1]] for k, e in self.base_signature.items()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def digest(self) -> str:
        """A short id of this erasure's content: method, concepts, config and every tensor's bytes."""
        digest = hashlib.sha256(json.dumps([self.method, self.concepts, self.config, self.module_type], sort_keys=True,
                                           default=str).encode())
        for prefix, tensors in (("delta", self.deltas), ("module", self.modules)):
            for name in sorted(tensors):
                digest.update(f"{prefix}.{name}{list(tensors[name].shape)}".encode())
                digest.update(tensors[name].detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.deltas.values()) + sum(t.numel() for t in self.modules.values())

    def metadata(self) -> dict:
        return {
            "format": FORMAT_VERSION, "method": self.method, "concepts": self.concepts, "base_model": self.base_model,
            "base_signature": self.base_signature, "config": self.config, "module_type": self.module_type,
            "info": self.info, "erasekit_version": self.erasekit_version,
        }

    def __repr__(self) -> str:
        kind = f"{len(self.deltas)} weight deltas" if self.deltas else f"{self.module_type} modules"
        return f"Erasure(method={self.method!r}, concepts={self.concepts}, base={self.base_model!r}, {kind}, {self.num_parameters:,} values)"

    # ------------------------------------------------------------------ disk
    @staticmethod
    def file_path(path: str | Path) -> Path:
        """Where :meth:`save` writes ``path``: with ``.safetensors`` added when it has another suffix or none."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
        return path

    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file atomically (a temporary file, then a rename) at :meth:`file_path`."""
        path = self.file_path(path)
        tensors = {f"delta.{k}": v.contiguous() for k, v in self.deltas.items()}
        tensors.update({f"module.{k}": v.contiguous() for k, v in self.modules.items()})
        return save_safetensors(path, tensors, metadata={"erasekit": json.dumps(self.metadata())})

    @classmethod
    def load(cls, path: str | Path) -> "Erasure":
        path = Path(path)
        if not path.is_file():
            raise ErasekitError(f"erasure file {path} does not exist; pass the .safetensors written by 'erasekit erase'")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as error:
            raise ErasekitError(f"{path} is not a readable safetensors file ({type(error).__name__}); pass a file written by 'erasekit erase'") from error
        if "erasekit" not in header:
            raise ErasekitError(f"{path} is a safetensors file without erasekit metadata; pass a file written by 'erasekit erase'")
        try:
            meta = json.loads(header["erasekit"])
            if not isinstance(meta, dict):
                raise TypeError("not an object")
            if meta.get("format", 0) > FORMAT_VERSION:
                raise ErasekitError(f"{path} uses erasure format {meta['format']}; upgrade erasekit to read it")
            _check_metadata(meta)
            erasure = cls(
                method=str(meta["method"]), concepts=[str(c) for c in meta["concepts"]], base_model=str(meta["base_model"]),
                config=dict(meta["config"]),
                deltas={k[len("delta."):]: v for k, v in tensors.items() if k.startswith("delta.")},
                modules={k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")},
                module_type=meta.get("module_type"), base_signature=dict(meta.get("base_signature") or {}),
                info=dict(meta.get("info") or {}), erasekit_version=str(meta.get("erasekit_version", "?")),
            )
        except ErasekitError:
            raise
        except (ValueError, TypeError, KeyError) as error:
            raise ErasekitError(f"{path} holds erasekit metadata erasekit cannot read ({type(error).__name__}: {error}); "
                                "pass a file written by 'erasekit erase'") from None
        for name, tensor in [*erasure.deltas.items(), *erasure.modules.items()]:
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ErasekitError(f"{path}: tensor {name} is not finite floating-point values; the file is damaged, "
                                    "make the erasure again")
            if tensor.numel() and tensor.abs().max() > MAX_VALUE:
                raise ErasekitError(f"{path}: tensor {name} holds values up to {tensor.abs().max():.3g}, far beyond any "
                                    f"weight change an erasure makes (at most {MAX_VALUE:g}); the file is damaged, make the erasure again")
        if not erasure.deltas and not erasure.modules:
            raise ErasekitError(f"{path} holds no deltas and no modules, so it would change nothing; make the erasure again")
        if erasure.modules and not isinstance(erasure.module_type, str):
            raise ErasekitError(f"{path} holds modules but names no module_type; make the erasure again")
        return erasure

    # ------------------------------------------------------------ the model
    def check_base(self, model, force: bool = False) -> None:
        """Refuse a model whose weights are not the ones this erasure was made from."""
        if force or not self.base_signature:
            return
        mismatch = _signature_mismatch(self.base_signature, model_signature(model, list(self.base_signature)))
        if mismatch:
            raise ErasekitError(
                f"this {self.method} erasure was made for {self.base_model!r}, not for {model.name!r} ({mismatch}); "
                "load the base model it was made for, or pass force=True (--force) to apply it anyway"
            )

    def apply(self, model, scale: float = 1.0, force: bool = False) -> "Erasure":
        """Apply to a loaded model, on top of any erasures already applied; undo with ``remove``."""
        if any(e is self for e, _ in model.applied_erasures):
            raise ErasekitError("this erasure is already applied to the model")
        digest = self.digest
        if any(e.digest == digest for e, _ in model.applied_erasures):
            raise ErasekitError(f"an erasure with the same content ({self.method} {self.concepts}) is already applied; "
                                "applying it again would count it twice: pass each erasure once")
        self.check_base(model, force)
        parameters = self._fitting_parameters(model)
        with torch.no_grad():
            for name, delta in self.deltas.items():
                parameter = parameters[name]
                if name not in model.original_parameters:
                    model.original_parameters[name] = parameter.detach().clone()
                parameter.add_(scale * delta.to(parameter.device, parameter.dtype))
        if self.modules:
            self._module_handler().attach(model, self, scale)
        model.applied_erasures.append((self, scale))
        return self

    def remove(self, model) -> None:
        """Take this erasure off; the weights it touched return to original + the other applied deltas."""
        remaining = [(e, s) for e, s in model.applied_erasures if e is not self]
        if len(remaining) == len(model.applied_erasures):
            raise ErasekitError("this erasure is not applied to the model")
        model.applied_erasures[:] = remaining
        if self.modules:
            self._module_handler().detach(model, self)
        parameters = model.weight_parameters()
        with torch.no_grad():
            for name in self.deltas:
                original = model.original_parameters[name]
                value = original.clone()
                still_touching = False
                for other, scale in remaining:
                    if name in other.deltas:
                        still_touching = True
                        value.add_(scale * other.deltas[name].to(value.device, value.dtype))
                parameters[name].copy_(value)
                if not still_touching:
                    del model.original_parameters[name]

    def merge(self, model, scale: float = 1.0, force: bool = False) -> None:
        """Add the deltas into the model's weights for good (they become the new originals)."""
        if self.modules:
            raise ErasekitError(f"a {self.method} erasure adds modules and cannot be merged into the weights; use apply")
        if any(e is self for e, _ in model.applied_erasures):
            raise ErasekitError("this erasure is applied to the model; remove it before merging it (else it would count twice)")
        self.check_base(model, force)
        parameters = self._fitting_parameters(model)
        with torch.no_grad():
            for name, delta in self.deltas.items():
                parameters[name].add_(scale * delta.to(parameters[name].device, parameters[name].dtype))
                if name in model.original_parameters:
                    model.original_parameters[name].add_(scale * delta.to(parameters[name].device, parameters[name].dtype))

    def _fitting_parameters(self, model) -> dict[str, torch.nn.Parameter]:
        """The model's parameters, once every delta is known to have one of its shape (checked before any is touched)."""
        parameters = model.weight_parameters()
        for name, delta in self.deltas.items():
            if name not in parameters:
                raise ErasekitError(f"the model has no parameter {name!r}; this {self.method} erasure was made for another architecture")
            if parameters[name].shape != delta.shape:
                raise ErasekitError(
                    f"{name} is {list(parameters[name].shape)} in the model but {list(delta.shape)} in this {self.method} erasure; "
                    "it was made for another architecture"
                )
        return parameters

    def _module_handler(self):
        """The class that attaches this erasure's modules (see :mod:`erasekit.modules`)."""
        handler = MODULE_ERASURES.get(self.module_type)
        if handler is None:
            raise ErasekitError(f"this erasekit has no support for {self.module_type!r} modules ({self.method}); upgrade erasekit")
        return handler


def apply_erasures(model, paths_or_erasures, force: bool = False) -> list[Erasure]:
    """Load (if paths) and apply several erasures in order."""
    applied = []
    for item in paths_or_erasures:
        erasure = item if isinstance(item, Erasure) else Erasure.load(item)
        applied.append(erasure.apply(model, force=force))
    return applied
