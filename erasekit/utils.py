"""Small shared helpers: atomic file and folder writes, per-sample seeds, image grids.

This module sits at the bottom of the import graph: it imports only the standard
library, torch, numpy, PIL, safetensors and :mod:`erasekit.errors`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from erasekit.errors import ErasekitError


class WriteError(ErasekitError):
    """A file or folder could not be written (disk full, no permission): one line naming path and reason."""


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


# ------------------------------------------------------------------ atomic writes
def _temporary_sibling(path: Path, suffix: str) -> Path:
    """A hidden name next to ``path``, unique per process and call, ending in ``suffix``."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp{suffix}")


def _write_error(path: Path, error: OSError) -> WriteError:
    reason = (error.strerror or str(error) or type(error).__name__).replace("\n", " ")
    if error.errno in _FULL:
        hint = "free space or choose another output location"
    elif error.errno in _DENIED:
        hint = "check the permissions or choose another output location"
    else:
        hint = "check the folder or choose another output location"
    return WriteError(f"could not write {path}: {reason}; {hint}")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


@contextmanager
def _written_in_place(path: Path, folder: bool) -> Iterator[Path]:
    """Yield a temporary file (or empty folder) next to ``path`` and, when the block succeeds, put it at ``path``.

    On any failure the temporary is removed, what was at ``path`` stays, and an OSError comes out as
    a one-line :class:`WriteError` (an ErasekitError).
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_sibling(path, "" if folder else path.suffix)
        if folder:
            tmp.mkdir()
        yield tmp
        if folder:
            _swap_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            _remove(tmp)
        if isinstance(error, OSError):
            raise _write_error(path, error) from error
        raise


def _swap_folder(tmp: Path, path: Path) -> None:
    """Rename the folder ``tmp`` to ``path``; a folder already there is moved aside first and removed after."""
    old = None
    if path.exists() or path.is_symlink():
        old = _temporary_sibling(path, ".old")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        _remove(old)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path`` (see :func:`_written_in_place`)."""
    path = Path(path)
    with _written_in_place(path, folder=False) as tmp:
        write(tmp)
    return path


def check_writable(path: str | Path, folder: bool = False, room: int = 0) -> None:
    """One line, before any work, when ``path`` (a file, or with ``folder`` a folder) could not be written: its
    nearest existing folder is not a writable folder, ``path`` is a file where a folder is wanted (or the other
    way round), or the disk has less than ``room`` bytes free. Nothing is created here."""
    path = Path(path).absolute()
    if path.exists() and path.is_dir() != folder:
        wanted = "a folder" if folder else "a file"
        raise WriteError(f"cannot write {path}: it exists and is not {wanted}; choose another output location")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise WriteError(f"cannot write {path}: {parent} is not a folder; choose another output location")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise WriteError(f"cannot write {path}: permission denied; check the permissions or choose another output location")
    free = shutil.disk_usage(parent).free
    if free < room:
        raise WriteError(f"cannot write {path}: {free / 2**20:,.1f} MiB free where about {room / 2**20:,.1f} MiB are needed; "
                         "free space or choose another output location")


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as JSON (indent 2, keys in their order) atomically."""
    return write_text(path, json.dumps(obj, indent=2))


def save_png(path: str | Path, image: Image.Image, text: dict[str, str] | None = None) -> Path:
    """Write a PIL image as PNG atomically; ``text`` goes into the file's text chunks (read back from ``Image.text``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as one .safetensors file atomically."""
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it replaces ``path``.

    On failure the temporary folder is removed and a previous folder at ``path`` stays.
    """
    with _written_in_place(Path(path), folder=True) as tmp:
        yield tmp


# ------------------------------------------------------------------ seeds and images
def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The generation seed of one sample of one prompt; every stored result depends on these values."""
    return (seed * 1_000_003 + prompt_index * 1009 + sample_index) % (2**31)


def image_grid(images: torch.Tensor, rows: int, labels: list[str] | None = None, scale: int = 4) -> Image.Image:
    """A PIL grid: images (N, 3, H, W) in [0,1] laid out row by row, each row optionally labelled on the left."""
    n, _, h, w = images.shape
    cols = (n + rows - 1) // rows
    label_width = 0 if not labels else 6 * max(len(label) for label in labels) + 12
    cell_h, cell_w = h * scale + 4, w * scale + 4
    canvas = Image.new("RGB", (label_width + cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    pictures = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for index in range(n):
        r, c = divmod(index, cols)
        tile = Image.fromarray(pictures[index]).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (label_width + c * cell_w + 2, r * cell_h + 2))
    for r, label in enumerate(labels or []):
        draw.text((4, r * cell_h + cell_h // 2 - 6), label, fill="black")
    return canvas
