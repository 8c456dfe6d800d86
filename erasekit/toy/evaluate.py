"""``erasekit toy eval`` and ``erasekit toy grid``: generate on the toy model and score with the classifier.

Seeds are derived from (run seed, prompt index, sample index), so the same prompt set gives
the same starting noise with and without an erasure: before/after comparisons are paired.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from erasekit.errors import ErasekitError
from erasekit.toy import world
from erasekit.toy.classifier import load_classifier
from erasekit.utils import image_grid, sample_seed, save_png


@dataclass(frozen=True)
class ToyPrompt:
    """A prompt and the attributes its images should show (None: not checked)."""

    prompt: str
    shape: str | None = None
    color: str | None = None
    style: str | None = None


def all_combinations() -> list[ToyPrompt]:
    """Every shape x color x style, with the canonical caption (144 prompts)."""
    return [
        ToyPrompt(world.canonical_prompt(s, c, st), s, c, st)
        for s in world.SHAPES for c in world.COLOR_NAMES for st in world.STYLES
    ]


def shape_prompts(shapes: list[str] | None = None, per_shape: int = 8, seed: int = 0) -> list[ToyPrompt]:
    """For each shape, ``per_shape`` canonical prompts with colour/style cycled (balanced)."""
    rng = np.random.default_rng(seed)
    prompts = []
    for shape in shapes or world.SHAPES:
        for k in range(per_shape):
            color = world.COLOR_NAMES[(k + rng.integers(6)) % 6]
            style = world.STYLES[k % 4]
            prompts.append(ToyPrompt(world.canonical_prompt(shape, color, style), shape, color, style))
    return prompts


def held_out_prompts(shapes: list[str] | None = None, per_word: int = 4) -> list[ToyPrompt]:
    """Paraphrases never seen in training: each shape's held-out names in a held-out template."""
    prompts = []
    for shape in shapes or world.SHAPES:
        for variant in range(len(world.HELD_OUT_SHAPE_NAMES[shape])):
            for k in range(per_word):
                color = world.COLOR_NAMES[(3 * k + variant + world.SHAPES.index(shape)) % 6]
                style = world.STYLES[(k + variant) % 4]
                prompts.append(ToyPrompt(world.held_out_prompt(shape, color, style, variant), shape, color, style))
    return prompts


def synonym_prompts(shapes: list[str] | None = None, per_word: int = 4) -> list[ToyPrompt]:
    """Each shape's second training name (e.g. 'three-sided shape' for triangle)."""
    prompts = []
    for shape in shapes or world.SHAPES:
        for name in world.SHAPE_NAMES[shape][1:]:
            for k in range(per_word):
                color, style = world.COLOR_NAMES[(k + 2) % 6], world.STYLES[k % 4]
                prompts.append(ToyPrompt(f"a {color} {name} on a {world.STYLE_WORDS[style][0]} background", shape, color, style))
    return prompts


PROMPT_SETS = {"all": all_combinations, "shapes": shape_prompts, "held-out": held_out_prompts, "synonyms": synonym_prompts}


def read_prompt_csv(path: str | Path) -> list[ToyPrompt]:
    """A CSV with columns prompt,shape,color,style (an empty cell means 'not checked')."""
    path = Path(path)
    if not path.is_file():
        raise ErasekitError(f"prompt file {path} does not exist")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise ErasekitError(f"{path} needs a 'prompt' column (columns: prompt,shape,color,style)")
        prompts = []
        for row in reader:
            values = {}
            for attribute, classes in world.ATTRIBUTES.items():
                value = (row.get(attribute) or "").strip() or None
                if value is not None and value not in classes:
                    raise ErasekitError(f"{path}: unknown {attribute} {value!r}; choose one of {classes}")
                values[attribute] = value
            prompts.append(ToyPrompt(row["prompt"], **values))
    return prompts


def resolve_prompts(spec: str | None) -> list[ToyPrompt]:
    """A built-in set name (all, shapes, held-out, synonyms) or a CSV path."""
    if spec is None:
        return all_combinations()
    if spec in PROMPT_SETS:
        return PROMPT_SETS[spec]()
    return read_prompt_csv(spec)


@torch.no_grad()
def generate_for_prompts(model, prompts: list[ToyPrompt], samples_per_prompt: int = 2, seed: int = 0,
                         batch_size: int = 96, guidance: float | None = None, steps: int | None = None,
                         progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Images (N, 3, H, W) in [0, 1] and, per image, the index of its prompt."""
    jobs = [(i, k) for i in range(len(prompts)) for k in range(samples_per_prompt)]
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="toy generate", disable=not progress, leave=False):
        chunk = jobs[start : start + batch_size]
        images.append(model.generate([prompts[i].prompt for i, _ in chunk], [sample_seed(seed, i, k) for i, k in chunk],
                                     guidance=guidance, num_inference_steps=steps))
    return torch.cat(images), [i for i, _ in jobs]


def score(prompts: list[ToyPrompt], images: torch.Tensor, prompt_of_image: list[int], classifier=None) -> dict:
    """Accuracy per attribute, overall, per prompt and per attribute value."""
    classifier = classifier or load_classifier()
    predicted = classifier.predict(images)
    per_prompt = []
    hits: dict[str, list[bool]] = {a: [] for a in world.ATTRIBUTES}
    by_value: dict[str, dict[str, list[bool]]] = {a: {} for a in world.ATTRIBUTES}
    for index, prompt in enumerate(prompts):
        rows = [j for j, p in enumerate(prompt_of_image) if p == index]
        accuracy = {}
        for attribute in world.ATTRIBUTES:
            target = getattr(prompt, attribute)
            if target is None or not rows:
                accuracy[attribute] = None
                continue
            correct = [predicted[attribute][j] == target for j in rows]
            hits[attribute] += correct
            by_value[attribute].setdefault(target, []).extend(correct)
            accuracy[attribute] = float(np.mean(correct))
        per_prompt.append({**asdict(prompt), "n": len(rows), "accuracy": accuracy,
                           "predicted": {a: [predicted[a][j] for j in rows] for a in world.ATTRIBUTES}})
    overall = {a: (float(np.mean(h)) if h else None) for a, h in hits.items()}
    values = {a: {v: float(np.mean(h)) for v, h in sorted(d.items())} for a, d in by_value.items()}
    return {"overall": overall, "by_value": values, "prompts": per_prompt}


def evaluate_toy(model, prompts: list[ToyPrompt] | None = None, samples_per_prompt: int = 2, seed: int = 0,
                 guidance: float | None = None, steps: int | None = None, progress: bool = True, classifier=None) -> dict:
    """Generate and score; the result has the JSON shape documented for ``erasekit toy eval``."""
    prompts = prompts if prompts is not None else all_combinations()
    images, prompt_of_image = generate_for_prompts(model, prompts, samples_per_prompt, seed, guidance=guidance, steps=steps, progress=progress)
    result = score(prompts, images, prompt_of_image, classifier)
    return {
        "model": model.name,
        "erasures": [{"method": e.method, "concepts": e.concepts, "fingerprint": e.fingerprint} for e, _ in model.applied_erasures],
        "seed": seed,
        "samples_per_prompt": samples_per_prompt,
        "guidance": guidance if guidance is not None else model.default_guidance,
        "steps": steps or model.default_steps,
        **result,
    }


def summary_lines(result: dict) -> list[str]:
    lines = ["overall accuracy: " + "  ".join(f"{a} {v:.1%}" for a, v in result["overall"].items() if v is not None)]
    for attribute, values in result["by_value"].items():
        if values:
            lines.append(f"  {attribute:<6}" + "  ".join(f"{k} {v:.0%}" for k, v in values.items()))
    return lines


def toy_grid(model, prompts: list[str], seeds: list[int], out: str | Path, guidance=None, steps=None) -> Path:
    """Write a PNG grid (prompts by seeds) a person can look at."""
    images = torch.cat([model.generate([p] * len(seeds), seeds, guidance=guidance, num_inference_steps=steps) for p in prompts])
    return save_png(out, image_grid(images, rows=len(prompts), labels=prompts))
