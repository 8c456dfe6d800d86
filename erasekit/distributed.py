"""Several processes on one job: which process this is, its share of the work, waiting for the others.

Under ``accelerate launch`` or ``torchrun`` every process runs the same command with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set. One place reads them (:func:`rank`, :func:`world_size`,
:func:`local_rank`); :func:`shard` takes this process's share of a list (every ``world_size``-th item,
starting at ``rank``) and :func:`process_device` turns ``cuda`` into this process's GPU.

Waiting for each other (:func:`barrier`, :func:`main_first`) goes through accelerate's ``PartialState``,
which joins the process group (NCCL between GPUs, gloo between CPU processes). Barriers run on a gloo
group with a long timeout (:data:`TIMEOUT`), so a process can wait on the CPU for hours while process 0
does work the others cannot share (a closed-form solve, merging results) without the group timing out.
A single process never touches torch.distributed. Nothing here pickles: processes exchange results
through files (per-prompt records, the erasure file), never through ``broadcast_object``.

This module sits at the bottom of the import graph (torch, accelerate and :mod:`erasekit.errors` only).
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch

from erasekit.errors import ErasekitError

TIMEOUT = datetime.timedelta(hours=12)  # how long a process waits at a barrier before the group gives up
_state: dict = {}  # "partial": accelerate's PartialState, "barrier_group": the gloo group barriers run on


def _launch() -> tuple[int, int]:
    """(rank, world size) as the launcher set them; (0, 1) inside :func:`alone`."""
    if _state.get("alone"):
        return 0, 1
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's index among all processes (0 when there is one)."""
    return _launch()[0]


def world_size() -> int:
    """How many processes run the job (1 without a launcher)."""
    return _launch()[1]


def local_rank() -> int:
    """This process's index on its machine: the GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """Process 0: the one that writes shared files."""
    return rank() == 0


def shard(items: list, rank: int | None = None, world_size: int | None = None) -> list:
    """This process's share of ``items``: every ``world_size``-th one from ``rank`` (from the environment when not given)."""
    index = _launch()[0] if rank is None else rank
    count = _launch()[1] if world_size is None else world_size
    return items[index::count]


def process_device(device: str | None) -> str | None:
    """Under a multi-process launch, ``cuda`` means this process's GPU (``cuda:LOCAL_RANK``; inside :func:`alone` too)."""
    if device == "cuda" and "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return f"cuda:{local_rank()}"
    return device


def start(device: str | torch.device | None = None):
    """Join the process group (once; a no-op for a single process); returns accelerate's ``PartialState`` or None.

    ``device`` says where this process computes: a CUDA device joins over NCCL, anything else (None:
    erasekit's default, the CPU) over gloo, so CPU processes work on a machine with GPUs too. Every
    process must pass the same kind of device. Later calls return the same state.
    """
    if not is_distributed():
        return None
    if "partial" not in _state:
        from accelerate import PartialState

        cpu = device is None or torch.device(device).type != "cuda"
        _state["partial"] = PartialState(cpu=cpu, timeout=TIMEOUT)
        if _state["partial"].num_processes != world_size():
            raise ErasekitError(f"the launcher says {world_size()} processes but the process group has "
                                f"{_state['partial'].num_processes}; launch with torchrun or accelerate launch")
    return _state["partial"]


def barrier() -> None:
    """Wait until every process gets here (a no-op for a single process)."""
    if not is_distributed():
        return
    start()
    group = _state.get("barrier_group")
    if group is None:
        backend = torch.distributed.get_backend()
        group = torch.distributed.group.WORLD if backend == "gloo" else torch.distributed.new_group(backend="gloo", timeout=TIMEOUT)
        _state["barrier_group"] = group
    torch.distributed.barrier(group=group)


@contextlib.contextmanager
def alone():
    """Inside the block this process works by itself, as process 0 of 1: what it runs shares nothing out and waits for no one.

    For work already divided by whole units (the bench gives each process its own cells): an attack or
    an erasure run inside computes all of itself here, as one process would. ``local_rank`` (the GPU)
    is unchanged. Blocks nest.
    """
    outer = _state.get("alone", False)
    _state["alone"] = True
    try:
        yield
    finally:
        _state["alone"] = outer


@contextlib.contextmanager
def main_first():
    """Process 0 runs the block first (it may write files the others then read), then the others do."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


@contextlib.contextmanager
def main_only():
    """Yields True on process 0, False elsewhere; every process leaves the block only when process 0 is done."""
    try:
        yield is_main()
    finally:
        barrier()
