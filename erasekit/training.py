"""The training harness shared by the trained methods (ESD, Receler, CPE) and the textual-inversion attack.

What every training loop here needs and none should write again:

* :class:`CheckpointConfig`: the ``checkpoint_dir`` / ``checkpoint_every`` / ``resume`` fields a
  trained method's config inherits;
* :class:`Checkpoints`: resumable state on disk, ``<name>-<step>.safetensors`` (tensors) beside
  ``<name>-<step>.json`` (everything else), written atomically, the newest pair kept. A checkpoint
  is keyed on everything that determines the run (the caller's ``key``: method, concepts, the
  config less the settings a resume may change, base weights); a folder holding another run is
  refused with one line, never reused. Nothing is pickled;
* :func:`optimizer_state` / :func:`load_optimizer_state` and :func:`generator_state` /
  :func:`set_generator_state`: an optimizer's and a ``torch.Generator``'s state as flat tensors and
  JSON, so that a resumed run continues bit for bit (on the CPU; CUDA kernels may differ in the last bits);
* :class:`Precision`: float32 master weights with CUDA autocast in bf16/fp16 (a gradient scaler for
  fp16); on a CPU it is float32 with a warning;
* :class:`DataParallel`: under ``accelerate launch`` or ``torchrun``, one run split over the processes
  (accelerate's ``Accelerator``): every process draws the same global batch from the same seed, computes
  its own contiguous slice of it, and the gradients are averaged before each optimiser step, so every
  process holds the weights one process would reach with the same global batch (up to float rounding:
  kernels differ in the last bits with the batch size). :func:`run` saves checkpoints on process 0 only;
* :func:`enable_gradient_checkpointing`: recompute a UNet's activations in the backward pass (a config
  switch of every method that backpropagates through the UNet), restored when the run ends.

Methods whose run cannot be split this way (UCE and RECE: one closed-form solve; CPE: no UNet pass, a
step is a few small matrix products) run on process 0 alone while the others wait
(:func:`erasekit.methods.run_method`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from erasekit import distributed
from erasekit.errors import ErasekitError
from erasekit.utils import save_safetensors, write_text

MIXED_PRECISION = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
# settings a resumed run may change: they change when or how it is computed, not what
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "checkpoint_dir", "resume", "gradient_checkpointing")


@dataclass
class CheckpointConfig:
    """The checkpoint fields of a trained method's config (its own fields follow)."""

    checkpoint_dir: str | None = field(default=None, metadata={"help": "Folder for resumable checkpoints (none: no checkpoints)."})
    checkpoint_every: int = field(default=500, metadata={"help": "Steps between checkpoints (only with checkpoint_dir).", "min": 1})
    resume: bool = field(default=False, metadata={
        "help": "Continue from the newest checkpoint in checkpoint_dir (it must hold the same run)."})


def comparable(config_dict: dict, resumable=RESUMABLE_CHANGES) -> dict:
    """A config's values less the ones a resumed run may change."""
    return {k: v for k, v in config_dict.items() if k not in resumable}


# ---------------------------------------------------------------------------------- state as data
def generator_state(generator: torch.Generator) -> str:
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def set_generator_state(generator: torch.Generator, text: str) -> None:
    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone())


def optimizer_state(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as flat tensors (``<prefix>.<param index>.<key>``) and JSON (the rest)."""
    state = optimizer.state_dict()
    tensors, values = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                values.setdefault(str(index), {})[key] = value
    return tensors, {"values": values, "param_groups": state["param_groups"]}


def load_optimizer_state(prefix: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict) -> None:
    """Restore what :func:`optimizer_state` wrote (tensors go to the parameters' devices)."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    for name, value in tensors.items():
        match = pattern.match(name)
        if match:
            index = int(match.group(1))
            if index >= len(parameters):
                raise ErasekitError(f"the checkpoint's optimizer state {prefix} does not fit this run; use another checkpoint_dir")
            device = parameters[index].device if match.group(2) != "step" else value.device
            state.setdefault(index, {})[match.group(2)] = value.to(device)
    for index, entries in saved["values"].items():
        state.setdefault(int(index), {}).update(entries)
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise ErasekitError(f"the checkpoint's optimizer {prefix} has other parameter groups; use another checkpoint_dir")
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


# ------------------------------------------------------------------------------------ checkpoints
def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The keys (dotted, nested dicts walked) whose values differ between ``a`` and ``b``."""
    changed = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            changed += differences(x, y, f"{prefix}{key}.")
        elif x != y:
            changed.append(f"{prefix}{key}")
    return changed


class Checkpoints:
    """Resumable training state in ``folder``: ``<name>-<step>`` pairs, keyed on the run's ``key``."""

    def __init__(self, folder: str | Path, name: str, key: dict):
        self.folder, self.name, self.key = Path(folder), name, json.loads(json.dumps(key))
        self._pattern = re.compile(rf"^{re.escape(name)}-(\d{{6,}})\.(json|safetensors)$")

    def save(self, step: int, tensors: dict[str, torch.Tensor], state: dict) -> Path:
        """Write the pair for ``step`` (tensors first, then the JSON that makes it complete); delete older pairs."""
        stem = self.folder / f"{self.name}-{step:06d}"
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_safetensors(stem.with_suffix(".safetensors"), tensors, metadata={"step": str(step)})
        write_text(stem.with_suffix(".json"), json.dumps({"step": step, "key": self.key, "state": state}))
        for old in self.folder.glob(f"{self.name}-*.*"):
            match = self._pattern.match(old.name)
            if match and int(match.group(1)) < step:
                old.unlink(missing_ok=True)
        return stem.with_suffix(".safetensors")

    def latest(self) -> Path | None:
        """The newest complete pair's .json (its .safetensors is there too)."""
        found = []
        for path in self.folder.glob(f"{self.name}-*.json") if self.folder.is_dir() else []:
            match = self._pattern.match(path.name)
            if match and path.with_suffix(".safetensors").is_file():
                found.append((int(match.group(1)), path))
        return max(found)[1] if found else None

    def load(self) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        """(step, tensors, state) of the newest pair, None when there is none; a pair of another run is refused."""
        path = self.latest()
        if path is None:
            return None
        try:
            meta = json.loads(path.read_text())
            saved_key, step = meta["key"], int(meta["step"])
            with safe_open(str(path.with_suffix(".safetensors")), framework="pt") as f:
                saved_step = int((f.metadata() or {}).get("step", -1))
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ErasekitError(f"the checkpoint {path} is unreadable ({type(error).__name__}); delete it or use another checkpoint_dir") from None
        changed = differences(saved_key, self.key)
        if changed:
            raise ErasekitError(
                f"the checkpoint in {self.folder} holds another run ({', '.join(changed)} differ); resume with the same "
                "model, concepts and settings, or use another checkpoint_dir"
            )
        if saved_step != step:
            raise ErasekitError(f"{path} and its .safetensors are from different steps; delete the newer pair and resume again")
        return step, tensors, meta["state"]


def resume_or_start(config, name: str, key: dict) -> tuple[Checkpoints | None, tuple | None]:
    """(checkpoints, what to resume from: (step, tensors, state) or None) for a config with
    :class:`CheckpointConfig` fields, checked before any training step.

    A folder holding another run is refused; one holding this run is resumed with ``resume`` and
    refused without it, so an interrupted run's checkpoint is never overwritten by accident.
    """
    if config.checkpoint_dir is None:
        if config.resume:
            raise ErasekitError("resume needs checkpoint_dir; pass --set checkpoint_dir=FOLDER")
        return None, None
    checkpoints = Checkpoints(config.checkpoint_dir, name, key)
    loaded = checkpoints.load()
    if loaded is not None and not config.resume:
        raise ErasekitError(
            f"{config.checkpoint_dir} holds a checkpoint of this run at step {loaded[0]}; pass --set resume=true to "
            "continue it, or choose another checkpoint_dir"
        )
    return checkpoints, loaded


def weights_digest(tensors: dict[str, torch.Tensor], samples: int = 4096) -> str:
    """A digest of named tensors from their shapes and exactly sampled values (no sums: the same on any thread count)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        flat = tensors[name].detach().reshape(-1)
        stride = max(1, flat.numel() // samples)
        digest.update(f"{name}{list(tensors[name].shape)}".encode())
        digest.update(flat[::stride].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ the loop
def run(trainer, name: str, description: str, progress: bool = True, postfix=None) -> None:
    """Run (or continue) ``trainer`` to ``trainer.config.iterations``, checkpointing on the way if asked.

    ``trainer`` has ``config`` (iterations and :class:`CheckpointConfig` fields), ``iteration``,
    ``step()``, ``checkpoint_key()``, ``training_state()`` and ``load_state(step, tensors, state)``;
    ``postfix(result of step)`` gives the progress bar's figures.

    Under several processes every process runs the loop (a data-parallel trainer averages its
    gradients, :class:`DataParallel`); every process resumes from the same checkpoint, only process 0
    writes checkpoints and shows the progress bar.
    """
    from tqdm.auto import tqdm

    config = trainer.config
    checkpoints, saved = resume_or_start(config, name, trainer.checkpoint_key())
    if saved is not None:
        trainer.load_state(*saved)
    distributed.barrier()  # every process has read the checkpoint before process 0 may replace it
    progress = progress and distributed.is_main()
    bar = tqdm(total=config.iterations, initial=min(trainer.iteration, config.iterations), desc=description, disable=not progress)
    with bar:
        while trainer.iteration < config.iterations:
            result = trainer.step()
            bar.update(1)
            if postfix is not None:
                bar.set_postfix(postfix(result))
            if checkpoints is not None and trainer.iteration % config.checkpoint_every == 0 and distributed.is_main():
                checkpoints.save(trainer.iteration, *trainer.training_state())


# -------------------------------------------------------------------------------------- precision
class Precision:
    """Autocast and gradient scaling for one run: float32 master weights, CUDA autocast in bf16/fp16."""

    def __init__(self, mixed_precision: str | None, device: torch.device, model_dtype: torch.dtype = torch.float32):
        if mixed_precision not in MIXED_PRECISION:
            raise ErasekitError(f"mixed_precision={mixed_precision!r}; use bf16, fp16 or none")
        compute = MIXED_PRECISION[mixed_precision]
        if compute is not None and device.type != "cuda":
            warnings.warn(f"mixed_precision={mixed_precision!r} needs a CUDA device; training in {model_dtype} on {device.type}")
            compute = None
        if compute is None and model_dtype in (torch.float16, torch.bfloat16):
            compute = model_dtype
        self.device, self.compute_dtype = device, compute
        self.scaler = torch.amp.GradScaler("cuda") if compute == torch.float16 and device.type == "cuda" else None

    def autocast(self):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, sync=None, inputs=None) -> None:
        """zero_grad, backward and step, through the gradient scaler when there is one.

        ``sync()`` runs between backward and step (:meth:`DataParallel.average_gradients`); ``inputs``
        limits the backward pass to these tensors' gradients (``Tensor.backward(inputs=...)``).
        """
        optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward(inputs=inputs)
        if sync is not None:
            sync()
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    @property
    def name(self) -> str:
        return str(self.compute_dtype).replace("torch.", "") if self.compute_dtype else "float32"


# --------------------------------------------------------------------------------- data parallel
class DataParallel:
    """One run split over the processes of a launch: a contiguous slice of every global batch each, gradients averaged.

    With one process it does nothing (``rows`` is the whole batch). With ``WORLD_SIZE`` processes the
    global ``batch_size`` must split evenly; process ``r`` computes rows ``rows`` of every batch that all
    processes draw alike, and :meth:`average_gradients` replaces each gradient by its mean over the
    processes (accelerate's ``Accelerator.reduce``), so the mean loss over the slices is the mean loss
    of the global batch and every process takes the same optimiser step.
    """

    BUCKET = 2**25  # values reduced in one call (128 MiB of float32)

    def __init__(self, batch_size: int, device: torch.device):
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self.accelerator = None
        if self.world_size > 1:
            if batch_size % self.world_size:
                raise ErasekitError(
                    f"batch_size={batch_size} does not split evenly over {self.world_size} processes; set batch_size to a "
                    f"multiple of {self.world_size} (it is the global batch: each process computes batch_size / processes)"
                )
            distributed.start(device)
            from accelerate import Accelerator
            from accelerate.state import AcceleratorState

            # autocast is Precision's; an Accelerator made before (the caller's) is joined as it is
            fresh = not AcceleratorState._shared_state
            options = {"cpu": torch.device(device).type != "cuda", "mixed_precision": "no"} if fresh else {}
            self.accelerator = Accelerator(**options)
        self.local_batch = batch_size // self.world_size
        self.rows = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, parameters) -> None:
        """Every parameter's gradient becomes its mean over the processes (a missing gradient counts as zero)."""
        if self.accelerator is None:
            return
        parameters = [p for p in parameters if p.requires_grad]
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for p in parameters:
            bucket.append(p.grad)
            size += p.grad.numel()
            if size >= self.BUCKET:
                self._reduce(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce(bucket)

    def mean(self, values: list[float]) -> list[float]:
        """The mean of each figure over the processes (a loss on each process's rows -> the loss of the global batch)."""
        if self.accelerator is None:
            return list(values)
        reduced = self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.accelerator.device), reduction="mean")
        return [float(v) for v in reduced.cpu()]

    def _reduce(self, grads: list[torch.Tensor]) -> None:
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for grad in grads:
            by_dtype.setdefault(grad.dtype, []).append(grad)
        for group in by_dtype.values():
            flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in group]), reduction="mean")
            offset = 0
            for grad in group:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()


# ------------------------------------------------------------------------- gradient checkpointing
def enable_gradient_checkpointing(unet, enabled: bool = True):
    """Make ``unet`` recompute its blocks' activations in the backward pass (when ``enabled``); returns the
    function that restores its previous setting (call it once the run ends)."""
    if not enabled or getattr(unet, "is_gradient_checkpointing", False):
        return lambda: None
    unet.enable_gradient_checkpointing()
    return unet.disable_gradient_checkpointing
