"""The ``toy`` protocol: one call that reports how well a concept is erased from the toy model.

For each erased concept (a shape, colour or style of the toy world) it measures, with the toy
classifier:

- ``erased``: how often images of prompts naming the concept still show it (lower = erased);
- ``other``: accuracy on the other values of the same attribute (locality; higher = intact);
- ``held_out``: how often held-out paraphrases of the concept still show it (robustness);
- ``toy_fid``: the Frechet distance between the classifier's 128-d features of all generated
  images and of procedural drawings of the same scenes (the toy's FID; lower = closer to the
  world the model was trained on).

Seeds are paired with ``erasekit toy eval`` (``sample_seed``), so the same call on the model
before and after an erasure compares the same starting noise. The settings live in
``erasekit.eval.protocols.PROTOCOLS["toy"]`` and are recorded in the result.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from erasekit.errors import ErasekitError
from erasekit.eval.fid import feature_statistics, frechet_distance
from erasekit.eval.protocols import ToyProtocol, get_protocol
from erasekit.toy import world
from erasekit.toy.classifier import load_classifier
from erasekit.toy.evaluate import ToyPrompt, generate_for_prompts, held_out_prompts, score, shape_prompts


def value_prompts(attribute: str, value: str, count: int, seed: int = 0) -> list[ToyPrompt]:
    """``count`` canonical prompts with ``attribute`` = ``value``, the other attributes cycled."""
    if attribute == "shape":
        return shape_prompts([value], per_shape=count, seed=seed)
    v = world.ATTRIBUTES[attribute].index(value)
    prompts = []
    for k in range(count):
        scene = {"shape": world.SHAPES[(k + v) % 6], "color": world.COLOR_NAMES[(k + 2 * v + 1) % 6], "style": world.STYLES[(k + v) % 4]}
        scene[attribute] = value
        prompts.append(ToyPrompt(world.canonical_prompt(**scene), **scene))
    return prompts


def paraphrase_prompts(attribute: str, value: str, per_word: int) -> list[ToyPrompt]:
    """Held-out paraphrases: a shape's two held-out names in the held-out template; for a colour
    or style, the held-out template (never seen in training) with the shape's held-out names."""
    if attribute == "shape":
        return held_out_prompts([value], per_word=per_word)
    prompts = []
    for k in range(2 * per_word):
        scene = {"shape": world.SHAPES[k % 6], "color": world.COLOR_NAMES[(k + 3) % 6], "style": world.STYLES[(k + 1) % 4]}
        scene[attribute] = value
        prompts.append(ToyPrompt(world.held_out_prompt(scene["shape"], scene["color"], scene["style"], variant=k // per_word), **scene))
    return prompts


def reference_images(prompts: list[ToyPrompt], prompt_of_image: list[int], seed: int) -> torch.Tensor:
    """A procedural drawing of each image's scene (its prompt's shape, colour and style), in [0, 1]."""
    rng = np.random.default_rng(seed)
    drawings = [world.draw(world.Scene(prompts[i].shape, prompts[i].color, prompts[i].style), rng) for i in prompt_of_image]
    return torch.from_numpy(np.stack(drawings).transpose(0, 3, 1, 2).astype(np.float32))


@torch.no_grad()
def evaluate_toy_protocol(model, concepts: list[str], samples_per_prompt: int | None = None, seed: int | None = None,
                          protocol: ToyProtocol | None = None, progress: bool = False, classifier=None) -> dict:
    """Generate the protocol's prompts with ``model`` (erasures applied as they are) and score them.

    ``samples_per_prompt`` and ``seed`` override the protocol's (the override is recorded in
    ``result["protocol"]``). Deterministic: the same model, concepts and settings give the same numbers.
    """
    start = time.perf_counter()
    protocol = protocol or get_protocol("toy")
    record = protocol.record()
    if samples_per_prompt is not None:
        record["samples_per_prompt"] = samples_per_prompt
    if seed is not None:
        record["seed"] = seed
    if not concepts:
        raise ErasekitError("no concept to evaluate; pass the erased concept(s), e.g. --concept triangle")
    resolved = [world.parse_concept(c) for c in concepts]

    # prompt groups: (kind, attribute, value) -> slice of the prompt list
    prompts: list[ToyPrompt] = []
    groups: list[tuple[str, str, str, int, int]] = []

    def add(kind: str, attribute: str, value: str, group: list[ToyPrompt]) -> None:
        groups.append((kind, attribute, value, len(prompts), len(prompts) + len(group)))
        prompts.extend(group)

    for attribute, value in dict.fromkeys(resolved):
        add("erased", attribute, value, value_prompts(attribute, value, protocol.prompts_per_concept, seed=record["seed"]))
        add("held_out", attribute, value, paraphrase_prompts(attribute, value, protocol.held_out_per_word))
    erased_values = {attribute: {v for a, v in resolved if a == attribute} for attribute, _ in resolved}
    for attribute, values in erased_values.items():
        for other in world.ATTRIBUTES[attribute]:
            if other not in values:
                add("other", attribute, other, value_prompts(attribute, other, protocol.prompts_per_other_value, seed=record["seed"]))

    images, prompt_of_image = generate_for_prompts(model, prompts, record["samples_per_prompt"], record["seed"],
                                                   guidance=protocol.guidance, steps=protocol.steps, progress=progress)
    classifier = classifier or load_classifier()
    scored = score(prompts, images, prompt_of_image, classifier)
    per_prompt = scored["prompts"]

    def accuracy(attribute: str, begin: int, end: int) -> float:
        return float(np.mean([per_prompt[i]["accuracy"][attribute] for i in range(begin, end)]))

    erased, held_out, other_by_value = {}, {}, {}
    for kind, attribute, value, begin, end in groups:
        for i in range(begin, end):
            per_prompt[i]["group"] = kind
        if kind == "erased":
            erased[value] = accuracy(attribute, begin, end)
        elif kind == "held_out":
            held_out[value] = accuracy(attribute, begin, end)
        else:
            other_by_value.setdefault(attribute, {})[value] = accuracy(attribute, begin, end)
    other = {attribute: float(np.mean(list(values.values()))) for attribute, values in other_by_value.items()}

    generated = classifier.features(images.float()).double().numpy()
    drawn = classifier.features(reference_images(prompts, prompt_of_image, protocol.reference_seed)).double().numpy()
    toy_fid = frechet_distance(*feature_statistics(generated), *feature_statistics(drawn), eps=protocol.fid_eps)

    return {
        "protocol": record,
        "model": model.name,
        "erasures": [{"method": e.method, "concepts": e.concepts, "fingerprint": e.fingerprint} for e, _ in model.applied_erasures],
        "concepts": list(concepts),
        "guidance": protocol.guidance if protocol.guidance is not None else model.default_guidance,
        "steps": protocol.steps or model.default_steps,
        "images": len(images),
        "erased_accuracy": float(np.mean(list(erased.values()))),
        "other_accuracy": float(np.mean(list(other.values()))),
        "held_out_accuracy": float(np.mean(list(held_out.values()))),
        "toy_fid": toy_fid,
        "erased": erased,
        "held_out": held_out,
        "other": other,
        "other_by_value": other_by_value,
        "prompts": per_prompt,
        "seconds": round(time.perf_counter() - start, 2),
    }


def toy_summary_lines(result: dict) -> list[str]:
    concepts = ", ".join(result["concepts"])
    return [
        f"protocol toy v{result['protocol']['version']}: {result['images']} images, concepts {concepts}",
        "  erased concept still drawn: " + "  ".join(f"{k} {v:.0%}" for k, v in result["erased"].items()),
        "  held-out paraphrases still drawn: " + "  ".join(f"{k} {v:.0%}" for k, v in result["held_out"].items()),
        "  other values intact: " + "  ".join(f"{k} {v:.0%}" for k, v in result["other"].items()),
        f"  toy FID: {result['toy_fid']:.2f}",
    ]
