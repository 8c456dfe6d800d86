"""Generation over prompt sets: seeded per prompt, batched, resumable, shardable.

Images are written as ``OUT/{case:05d}_{k}.png`` (case: the prompt's index or the CSV's
``case_number``; k: the sample index), each to a temporary name and then renamed, so an
interrupted run never leaves a half-written image.

Beside the images, ``OUT/metadata.jsonl`` has one line per image (file, case, sample, prompt,
seed, guidance, and ``key``: a digest of everything that determines the image — the model's
weights, the applied erasures' contents and scales, prompt, seed, guidance, steps, scheduler,
dtype, size); ``erasekit evaluate`` reads the prompts from it. A rerun skips an image only when
its entry has the same key and the file is a readable image (an unreadable one is made again);
a folder whose images were made with other settings is refused unless ``overwrite``.

Under ``accelerate launch`` (or any launcher that sets ``RANK``/``WORLD_SIZE``), each
process takes every WORLD_SIZE-th image, so no image is written twice; process 0 writes the
metadata, and on GPUs each process uses the GPU of its ``LOCAL_RANK``.

Prompt files: an I2P-style CSV (columns ``prompt`` and optionally ``evaluation_seed``/``sd_seed``/
``seed``, ``evaluation_guidance``/``sd_guidance_scale``/``guidance``, ``case_number``; other
columns such as ``categories`` are ignored; names are matched case-insensitively), a text file
with one prompt a line, or ``toy:SET`` for a toy-world prompt set (all, shapes, held-out, synonyms).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erasekit.errors import ErasekitError
from erasekit.models.handle import to_pil
from erasekit.utils import save_png, write_text

SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance")
CASE_COLUMNS = ("case_number", "case", "index")
METADATA_FILE = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class PromptJob:
    """One image to make."""

    case: int
    sample: int
    prompt: str
    seed: int
    guidance: float | None = None

    @property
    def filename(self) -> str:
        return f"{self.case:05d}_{self.sample}.png"


def _first(row: dict, columns) -> str | None:
    for column in columns:
        if row.get(column) not in (None, ""):
            return row[column]
    return None


def _read_rows(path: str) -> list[dict]:
    """Rows with at least a 'prompt' key from a CSV, a text file or a toy prompt set."""
    if path.startswith("toy:"):
        from erasekit.toy.evaluate import PROMPT_SETS

        name = path[len("toy:"):]
        if name not in PROMPT_SETS:
            raise ErasekitError(f"unknown toy prompt set {name!r}; choose one of {', '.join('toy:' + n for n in PROMPT_SETS)}")
        return [{"prompt": p.prompt} for p in PROMPT_SETS[name]()]
    file = Path(path)
    if not file.is_file():
        raise ErasekitError(f"prompt file {file} does not exist")
    if file.suffix.lower() != ".csv":
        return [{"prompt": line.strip()} for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    with file.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is not part of a name
        reader = csv.DictReader(f)
        names = {name: name.strip().lower() for name in reader.fieldnames or []}
        if "prompt" not in names.values():
            raise ErasekitError(f"{file} has no 'prompt' column; the CSV needs prompt (and optionally seed/evaluation_seed, guidance/evaluation_guidance, case_number)")
        return [{names[k]: (v or "").strip() for k, v in row.items() if k in names} for row in reader]


def read_prompts(path: str | None = None, prompts: list[str] | None = None, seed: int = 0,
                 samples_per_prompt: int = 1, guidance: float | None = None) -> list[PromptJob]:
    """Jobs from a prompt file (I2P-style CSV, text file or ``toy:SET``) and/or prompts.

    Seeds: a row's own seed column (sample k gets seed + k), else ``seed * 100003 + row index + k``.
    Rows with an empty prompt are skipped (their case numbers are not reused).
    """
    rows: list[dict] = _read_rows(path) if path else []
    rows += [{"prompt": p} for p in prompts or []]
    if not any(row["prompt"] for row in rows):
        raise ErasekitError("no prompts; pass --prompt TEXT or --prompts FILE")
    jobs = []
    cases: set[int] = set()
    for index, row in enumerate(rows):
        if not row["prompt"]:
            continue
        try:
            case = int(float(_first(row, CASE_COLUMNS) or index))
            row_seed = _first(row, SEED_COLUMNS)
            row_guidance = _first(row, GUIDANCE_COLUMNS)
            base = int(float(row_seed)) if row_seed is not None else seed * 100_003 + index
            row_guidance = float(row_guidance) if row_guidance is not None else guidance
        except ValueError as error:
            raise ErasekitError(f"prompt row {index + 1}: a case, seed or guidance value is not a number ({error}); fix that cell") from error
        if case in cases:
            raise ErasekitError(f"prompt row {index + 1}: case number {case} appears twice, so two prompts would write one image; make case_number unique")
        cases.add(case)
        for k in range(samples_per_prompt):
            jobs.append(PromptJob(case, k, row["prompt"], base + k, row_guidance))
    return jobs


def shard(jobs: list, rank: int | None = None, world_size: int | None = None) -> list:
    """This process's share of the jobs (from RANK/WORLD_SIZE when not given)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    return jobs[rank::world_size]


def process_device(device: str | None) -> str | None:
    """Under a multi-process launch, ``cuda`` means this process's GPU (``cuda:LOCAL_RANK``)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device == "cuda" and local_rank is not None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return f"cuda:{int(local_rank)}"
    return device


def generation_settings(model, steps: int | None = None, scheduler: str | None = None) -> dict:
    """Everything besides prompt, seed and guidance that determines a generated image."""
    from erasekit.training import weights_digest

    return {
        "model": model.name, "weights": weights_digest(dict(model.unet.named_parameters())),
        "erasures": [[erasure.digest, scale] for erasure, scale in model.applied_erasures],
        "steps": steps or model.default_steps, "default_guidance": model.default_guidance,
        "scheduler": scheduler or type(model.scheduler).__name__, "dtype": str(model.dtype), "size": model.resolution,
    }


def image_key(job: PromptJob, settings: dict | None) -> str | None:
    """The digest that names one image: the job and the settings it was made with."""
    if settings is None:
        return None
    text = json.dumps([job.prompt, job.seed, job.guidance, settings], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_metadata(jobs: list[PromptJob], out: str | Path, settings: dict | None = None) -> Path:
    """Write (or extend) ``OUT/metadata.jsonl``, one line per image (with its key when ``settings`` are given), atomically."""
    path = Path(out) / METADATA_FILE
    entries = {entry["file"]: entry for entry in read_metadata(out)} if path.exists() else {}
    for job in jobs:
        entry = {"file": job.filename, "case": job.case, "sample": job.sample, "prompt": job.prompt, "seed": job.seed,
                 "guidance": job.guidance}
        if settings is not None:
            entry["key"] = image_key(job, settings)
        entries[job.filename] = entry
    return write_text(path, "".join(json.dumps(entries[name]) + "\n" for name in sorted(entries)))


def _readable_image(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # any decoding failure: the file is made again
        return False


def check_folder(jobs: list[PromptJob], out: Path, settings: dict, overwrite: bool = False) -> None:
    """Refuse (one line) a folder whose images were made with other settings; with ``overwrite``, forget them."""
    if not (out / METADATA_FILE).is_file():
        stray = [job.filename for job in jobs if (out / job.filename).exists()]
        if stray and not overwrite:
            raise ErasekitError(f"{out} holds {stray[0]} but no {METADATA_FILE}, so what made it is unknown; "
                                "pass --overwrite or choose another --out")
        return
    entries = {entry.get("file"): entry for entry in read_metadata(out)}
    wanted = {job.filename: image_key(job, settings) for job in jobs}
    other = [name for name, entry in entries.items() if name in wanted and entry.get("key") != wanted[name]]
    if other and not overwrite:
        raise ErasekitError(
            f"{out} holds {len(other)} image(s) made with other settings (e.g. {other[0]}: another prompt, seed, guidance, "
            "model, erasure, steps, scheduler, dtype or size); pass --overwrite to make them again, or choose another --out"
        )


def read_metadata(folder: str | Path) -> list[dict]:
    """The entries of ``FOLDER/metadata.jsonl`` (what ``erasekit generate`` wrote)."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise ErasekitError(f"{folder} has no {METADATA_FILE}, so its prompts are unknown; make the folder with erasekit generate")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise ErasekitError(f"{path} is not valid JSON lines ({error}); regenerate it with erasekit generate") from error


def load_image_folder(folder: str | Path) -> list[tuple[str, torch.Tensor]]:
    """(file name, image (3, H, W) float in [0, 1]) for every image in a folder, sorted by name."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ErasekitError(f"image folder {folder} does not exist; pass a folder written by erasekit generate")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ErasekitError(f"{folder} has no images (.png, .jpg, .webp); generate some with erasekit generate")
    images = []
    for file in files:
        with Image.open(file) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        images.append((file.name, torch.from_numpy(array).permute(2, 0, 1).contiguous()))
    return images


@torch.no_grad()
def generate_to_folder(model, jobs: list[PromptJob], out: str | Path, batch_size: int = 8, steps: int | None = None,
                       progress: bool = True, rank: int | None = None, world_size: int | None = None,
                       overwrite: bool = False) -> int:
    """Generate every image of this process's shard that is missing, unreadable or made otherwise; returns how many
    were written. A folder holding images of other settings is refused unless ``overwrite``."""
    out = Path(out)
    settings = generation_settings(model, steps)
    check_folder(jobs, out, settings, overwrite)
    done = {}
    if (out / METADATA_FILE).is_file():
        done = {entry.get("file"): entry.get("key") for entry in read_metadata(out)}
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    if rank == 0:
        write_metadata(jobs, out, settings)

    def finished(job) -> bool:
        path = out / job.filename
        return done.get(job.filename) == image_key(job, settings) and path.exists() and _readable_image(path)

    mine = [job for job in shard(jobs, rank, world_size) if not finished(job)]
    written = 0
    # batch jobs that share a guidance scale
    groups: dict = {}
    for job in mine:
        groups.setdefault(job.guidance, []).append(job)
    bar = tqdm(total=len(mine), desc="generate", disable=not progress)
    for guidance, group in groups.items():
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            images = model.generate([j.prompt for j in batch], [j.seed for j in batch], guidance=guidance, num_inference_steps=steps)
            for job, image in zip(batch, to_pil(images)):
                save_png(out / job.filename, image)
                written += 1
            bar.update(len(batch))
    bar.close()
    return written
