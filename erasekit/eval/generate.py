"""Generation over prompt sets: seeded per prompt, batched, resumable, shardable.

Images are written as ``OUT/{case:05d}_{k}.png`` (case: the prompt's index or the CSV's
``case_number``; k: the sample index), each to a temporary name and then renamed, so an
interrupted run never leaves a half-written image.

Each image carries its ``key`` in a PNG text chunk (``erasekit-key``): a digest of everything that
determines it — the model's weights, the applied erasures' contents and scales, prompt, seed,
guidance, steps, scheduler, dtype, size. Beside the images, ``OUT/metadata.jsonl`` has one line per
image (file, case, sample, prompt, seed, guidance, key); ``erasekit evaluate`` reads the prompts
from it. A rerun skips an image only when the file is a readable image holding the wanted key (an
unreadable one is made again); a folder whose images were made with other settings is refused
unless ``overwrite``.

Several processes may share one ``OUT``: before making an image a process claims it (a hidden
``.NAME.claim`` file, naming host and process id, hard-linked into place from a draft so that it
appears whole or not at all) and leaves images claimed by
another live process to it; a claim left by a process that died on this host is taken over.
Under ``accelerate launch`` (or any launcher that sets ``RANK``/``WORLD_SIZE``), each process takes
every WORLD_SIZE-th image; process 0 writes the metadata, and on GPUs each process uses the GPU
of its ``LOCAL_RANK``.

Prompt files: an I2P-style CSV (columns ``prompt`` and optionally ``evaluation_seed``/``sd_seed``/
``seed``, ``evaluation_guidance``/``sd_guidance_scale``/``guidance``, ``case_number``; other
columns such as ``categories`` are ignored; names are matched case-insensitively), a text file
with one prompt a line, or ``toy:SET`` for a toy-world prompt set (all, shapes, held-out, synonyms).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erasekit import distributed
from erasekit.distributed import process_device, shard  # noqa: F401 (shard, process_device: re-exported)
from erasekit.errors import ErasekitError
from erasekit.models.handle import to_pil
from erasekit.utils import save_png, write_text

SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance")
CASE_COLUMNS = ("case_number", "case", "index")
METADATA_FILE = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PROMPT_FILE = 64 * 2**20
MAX_PROMPT_CHARS = 10_000


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


def read_rows(path: str) -> list[dict]:
    """Rows with at least a 'prompt' key from a CSV, a text file or a toy prompt set."""
    if path.startswith("toy:"):
        from erasekit.toy.evaluate import PROMPT_SETS

        name = path[len("toy:"):]
        if name not in PROMPT_SETS:
            raise ErasekitError(f"unknown toy prompt set {name!r}; choose one of {', '.join('toy:' + n for n in PROMPT_SETS)}")
        return [{"prompt": p.prompt} for p in PROMPT_SETS[name]()]
    file = Path(path)
    if not file.is_file():
        raise ErasekitError(f"prompt file {file} does not exist; check the path")
    if file.stat().st_size > MAX_PROMPT_FILE:
        raise ErasekitError(f"prompt file {file} is over {MAX_PROMPT_FILE // 2**20} MiB; split it into smaller files")
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not part of a name
    except UnicodeDecodeError:
        raise ErasekitError(f"prompt file {file} is not UTF-8 text; save it as UTF-8 (a CSV or one prompt a line)") from None
    if "\x00" in text:
        raise ErasekitError(f"prompt file {file} holds binary data; pass a UTF-8 CSV or text file")
    if file.suffix.lower() != ".csv":
        rows = [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    else:
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            names = {name: name.strip().lower() for name in reader.fieldnames or [] if name is not None}
            if "prompt" not in names.values():
                raise ErasekitError(f"{file} has no 'prompt' column; the CSV needs prompt (and optionally seed/evaluation_seed, guidance/evaluation_guidance, case_number)")
            rows = [{names[k]: (v if isinstance(v, str) else "").strip() for k, v in row.items() if k in names} for row in reader]
        except csv.Error as error:
            raise ErasekitError(f"{file} is not a readable CSV ({error}); fix the file or pass one prompt a line") from None
    for index, row in enumerate(rows):
        if len(row.get("prompt", "")) > MAX_PROMPT_CHARS:
            raise ErasekitError(f"{file}: prompt {index + 1} is {len(row['prompt']):,} characters long; a prompt is at most "
                                f"{MAX_PROMPT_CHARS:,} (the text encoder reads far fewer): shorten it")
    return rows


def read_prompts(path: str | None = None, prompts: list[str] | None = None, seed: int = 0,
                 samples_per_prompt: int = 1, guidance: float | None = None) -> list[PromptJob]:
    """Jobs from a prompt file (I2P-style CSV, text file or ``toy:SET``) and/or prompts.

    Seeds: a row's own seed column (sample k gets seed + k), else ``seed * 100003 + row index + k``.
    Rows with an empty prompt are skipped (their case numbers are not reused).
    """
    rows: list[dict] = read_rows(path) if path else []
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
            raise ErasekitError(f"prompt row {index + 1}: a case, seed or guidance value is not a number ({error}); fix that cell") from None
        if row_guidance is not None and not 0 <= row_guidance < 1e4:  # also nan and ±inf
            raise ErasekitError(f"prompt row {index + 1}: guidance {row_guidance} is not a finite scale from 0 to 10,000; fix that cell")
        if not 0 <= base < 2**31 or case < 0:
            raise ErasekitError(f"prompt row {index + 1}: seed {base} or case {case} is out of range (seeds 0 to 2^31-1, cases ≥ 0); fix that cell")
        if case in cases:
            raise ErasekitError(f"prompt row {index + 1}: case number {case} appears twice, so two prompts would write one image; make case_number unique")
        cases.add(case)
        for k in range(samples_per_prompt):
            jobs.append(PromptJob(case, k, row["prompt"], base + k, row_guidance))
    return jobs


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


KEY_TEXT = "erasekit-key"  # the PNG text chunk that holds an image's key


def _image_key_in_file(path: Path) -> str | None:
    """The key a readable image was made with ('' when it has none); None when the file is missing or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            key = str(image.info.get(KEY_TEXT, ""))  # (written before the pixels, so read without decoding them)
            image.verify()  # every chunk there, with its checksum
        return key
    except Exception:  # missing, truncated or not an image: it is made again
        return None


def check_folder(jobs: list[PromptJob], out: Path, settings: dict, overwrite: bool = False) -> dict[str, str | None]:
    """The key of each job's image already in ``out`` (None: none there, or unreadable). Refuses (one line) a folder
    that holds images of these names made with other settings (or by something else), unless ``overwrite``."""
    if not out.is_dir():
        return {job.filename: None for job in jobs}
    found = {job.filename: _image_key_in_file(out / job.filename) for job in jobs}
    listed = {}
    if not overwrite and (out / METADATA_FILE).is_file():
        listed = {entry.get("file"): entry.get("key") for entry in read_metadata(out)}
    for job in jobs if not overwrite else []:
        path = out / job.filename
        if not path.exists():
            continue
        key = found[job.filename] or listed.get(job.filename)  # (older folders keep keys in the metadata only)
        if key == image_key(job, settings) or (key is None and job.filename in listed):
            continue  # done, or listed but unreadable: made again
        if not key:
            raise ErasekitError(f"{out} holds {job.filename}, which erasekit generate did not make (no key in it or in "
                                f"{METADATA_FILE}), so what made it is unknown; pass --overwrite or choose another --out")
        raise ErasekitError(
            f"{out} holds image(s) made with other settings (e.g. {job.filename}: another prompt, seed, guidance, model, "
            "erasure, steps, scheduler, dtype or size); pass --overwrite to make them again, or choose another --out"
        )
    return found


def _claim(out: Path, job: PromptJob) -> Path | None:
    """Claim one image for this process; None when another live process holds it. The claim is written to a draft
    and hard-linked into place, so it never exists without its owner in it (a process killed between creating and
    writing an empty claim would otherwise keep its image from others for a minute)."""
    path = out / f".{job.filename}.claim"
    draft = out / f".{job.filename}.claim.{os.getpid()}.tmp"
    draft.write_text(f"{socket.gethostname()} {os.getpid()}")
    try:
        for _ in range(2):
            try:
                os.link(draft, path)  # fails if the claim exists, like O_EXCL
            except FileExistsError:
                if not _stale_claim(path):
                    return None
                path.unlink(missing_ok=True)
                continue
            return path
        return None
    finally:
        draft.unlink(missing_ok=True)


def _remove_dead_drafts(out: Path) -> None:
    """Remove claim drafts left by processes killed while claiming."""
    for draft in out.glob(".*.claim.*.tmp"):
        if _stale_claim(draft):
            draft.unlink(missing_ok=True)


def _stale_claim(path: Path) -> bool:
    """A claim whose process is gone: on this host and not running (or this very process), or empty for a minute."""
    try:
        text = path.read_text().split()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return True
    if len(text) != 2 or not text[1].isdigit():
        return age > 60
    host, pid = text[0], int(text[1])
    if host != socket.gethostname():
        return False  # another machine's process: it cannot be checked from here, so it is left to it
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def read_metadata(folder: str | Path) -> list[dict]:
    """The entries of ``FOLDER/metadata.jsonl`` (what ``erasekit generate`` wrote)."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise ErasekitError(f"{folder} has no {METADATA_FILE}, so its prompts are unknown; make the folder with erasekit generate")
    try:
        entries = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ErasekitError(f"{path} is not valid JSON lines ({type(error).__name__}); make the folder again with erasekit generate --overwrite") from None
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(entry.get("prompt"), str):
            raise ErasekitError(f"{path} line {number} is not an image entry (an object with file and prompt); "
                                "make the folder again with erasekit generate --overwrite")
    return entries


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
        try:
            with Image.open(file) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        except Exception as error:  # truncated, not an image, unsupported mode: one line, not a trace
            raise ErasekitError(f"{file} is not a readable image ({type(error).__name__}); remove it or make the folder "
                                "again with erasekit generate --overwrite") from None
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
    found = check_folder(jobs, out, settings, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    rank = distributed.rank() if rank is None else rank
    if rank == 0:
        write_metadata(jobs, out, settings)
    keys = {job: image_key(job, settings) for job in jobs}
    mine = [job for job in shard(jobs, rank, world_size) if found[job.filename] != keys[job]]
    # batch jobs that share a guidance scale; claim each batch just before making it
    groups: dict = {}
    for job in mine:
        groups.setdefault(job.guidance, []).append(job)
    with tqdm(total=len(mine), desc="generate", disable=not progress) as bar:  # (closed, so an error starts a line of its own)
        written, elsewhere = _make(model, out, groups, keys, batch_size, steps, bar)
    _remove_dead_drafts(out)
    if elsewhere:
        print(f"{elsewhere} image(s) were being made by another process and were left to it; rerun when it is done to check")
    return written


def _make(model, out: Path, groups: dict, keys: dict, batch_size: int, steps: int | None, bar) -> tuple[int, int]:
    """Make the images of ``groups`` (jobs by guidance), claiming each batch first; (written, left to others)."""
    written = elsewhere = 0
    for guidance, group in groups.items():
        for start in range(0, len(group), batch_size):
            claims = {}
            try:
                for job in group[start : start + batch_size]:
                    claim = _claim(out, job)
                    if claim is None:
                        elsewhere += 1
                    elif _image_key_in_file(out / job.filename) == keys[job]:
                        claim.unlink(missing_ok=True)  # another process made it (and let go of it) meanwhile
                    else:
                        claims[job] = claim
                batch = list(claims)
                if batch:
                    images = model.generate([j.prompt for j in batch], [j.seed for j in batch], guidance=guidance,
                                            num_inference_steps=steps)
                    for job, image in zip(batch, to_pil(images)):
                        save_png(out / job.filename, image, text={KEY_TEXT: keys[job]})
                        written += 1
            finally:
                for claim in claims.values():
                    claim.unlink(missing_ok=True)
            bar.update(min(batch_size, len(group) - start))
    return written, elsewhere
