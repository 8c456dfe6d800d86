"""Generation over prompt sets: seeded per prompt, batched, resumable, shardable.

Images are written as ``OUT/{case:05d}_{k}.png`` (case: the prompt's index or the CSV's
``case_number``; k: the sample index), each to a temporary name and then renamed, so an
interrupted run never leaves a half-written image and a rerun skips finished ones.

Under ``accelerate launch`` (or any launcher that sets ``RANK``/``WORLD_SIZE``), each
process takes every WORLD_SIZE-th image, so no image is written twice.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erasekit.errors import ErasekitError
from erasekit.models.handle import to_pil

SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance")
CASE_COLUMNS = ("case_number", "case", "index")


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


def read_prompts(path: str | None = None, prompts: list[str] | None = None, seed: int = 0,
                 samples_per_prompt: int = 1, guidance: float | None = None) -> list[PromptJob]:
    """Jobs from a CSV (I2P-style columns understood), a text file (one prompt a line) and/or prompts."""
    rows: list[dict] = []
    if path:
        file = Path(path)
        if not file.is_file():
            raise ErasekitError(f"prompt file {file} does not exist")
        if file.suffix.lower() == ".csv":
            with file.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or "prompt" not in reader.fieldnames:
                    raise ErasekitError(f"{file} has no 'prompt' column; the CSV needs prompt (and optionally seed/evaluation_seed, guidance/evaluation_guidance, case_number)")
                rows = list(reader)
        else:
            rows = [{"prompt": line.strip()} for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows += [{"prompt": p} for p in prompts or []]
    if not rows:
        raise ErasekitError("no prompts; pass --prompt TEXT or --prompts FILE")
    jobs = []
    for index, row in enumerate(rows):
        case = int(float(_first(row, CASE_COLUMNS) or index))
        row_seed = _first(row, SEED_COLUMNS)
        row_guidance = _first(row, GUIDANCE_COLUMNS)
        for k in range(samples_per_prompt):
            base = int(float(row_seed)) if row_seed is not None else seed * 100_003 + index
            jobs.append(PromptJob(case, k, row["prompt"], base + k, float(row_guidance) if row_guidance else guidance))
    return jobs


def shard(jobs: list, rank: int | None = None, world_size: int | None = None) -> list:
    """This process's share of the jobs (from RANK/WORLD_SIZE when not given)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    return jobs[rank::world_size]


@torch.no_grad()
def generate_to_folder(model, jobs: list[PromptJob], out: str | Path, batch_size: int = 8, steps: int | None = None,
                       progress: bool = True, rank: int | None = None, world_size: int | None = None) -> int:
    """Generate every missing image of this process's shard; returns how many were written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = [job for job in shard(jobs, rank, world_size) if not (out / job.filename).exists()]
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
                tmp = out / f".{job.filename}.tmp.png"
                image.save(tmp)
                os.replace(tmp, out / job.filename)
                written += 1
            bar.update(len(batch))
    bar.close()
    return written
