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
from erasekit.eval.stats import rate_record
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

    def hits(attributes, begin: int, end: int) -> tuple[int, int]:
        """(images whose classified ``attributes`` match their prompt, images) over prompts begin..end."""
        shown = n = 0
        for i in range(begin, end):
            entry = per_prompt[i]
            for attribute in attributes:
                n += len(entry["predicted"][attribute])
                shown += sum(p == entry[attribute] for p in entry["predicted"][attribute])
        return shown, n

    erased, held_out, other_by_value, rates = {}, {}, {}, {"erased": {}, "held_out": {}, "other_by_value": {}}
    other_counts, other_attribute_counts = {}, {}
    for kind, attribute, value, begin, end in groups:
        for i in range(begin, end):
            per_prompt[i]["group"] = kind
        shown, n = hits([attribute], begin, end)
        if kind == "erased":
            erased[value], rates["erased"][value] = shown / n, rate_record(shown, n)
        elif kind == "held_out":
            held_out[value], rates["held_out"][value] = shown / n, rate_record(shown, n)
        else:
            other_by_value.setdefault(attribute, {})[value] = shown / n
            rates["other_by_value"].setdefault(attribute, {})[value] = rate_record(shown, n)
            total = other_counts.setdefault(attribute, [0, 0])
            total[0], total[1] = total[0] + shown, total[1] + n
        # the attributes not erased, on every image of the group: does erasing a colour hurt shapes?
        kept = [a for a in world.ATTRIBUTES if a not in erased_values]
        for a in kept:
            shown_a, n_a = hits([a], begin, end)
            total = other_attribute_counts.setdefault(a, [0, 0])
            total[0], total[1] = total[0] + shown_a, total[1] + n_a
    other = {attribute: float(np.mean(list(values.values()))) for attribute, values in other_by_value.items()}
    rates["other"] = {attribute: rate_record(*counts) for attribute, counts in other_counts.items()}
    rates["other_attributes"] = {attribute: rate_record(*counts) for attribute, counts in other_attribute_counts.items()}
    rates["erased_all"] = rate_record(*[sum(r[k] for r in rates["erased"].values()) for k in ("shown", "n")])
    rates["held_out_all"] = rate_record(*[sum(r[k] for r in rates["held_out"].values()) for k in ("shown", "n")])
    rates["other_all"] = rate_record(*[sum(c[i] for c in other_counts.values()) for i in (0, 1)])

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
        "other_attribute_accuracy": {a: r["rate"] for a, r in rates["other_attributes"].items()},
        "rates": rates,
        "prompts": per_prompt,
        "seconds": round(time.perf_counter() - start, 2),
    }


def rate_text(record: dict) -> str:
    """``"12% (3/25, 95% CI 4-30%)"``: a rate with its counts and Wilson interval."""
    if not record or record.get("rate") is None:
        return "n/a (0 images)"
    low, high = record["ci95"]
    return f"{record['rate']:.0%} ({record['shown']}/{record['n']}, 95% CI {low:.0%}-{high:.0%})"


def toy_summary_lines(result: dict) -> list[str]:
    concepts = ", ".join(result["concepts"])
    rates = result.get("rates", {})
    lines = [f"protocol toy v{result['protocol']['version']}: {result['images']} images, concepts {concepts}"]
    lines += [f"  erased concept still drawn, {k}: {rate_text(r)}" for k, r in rates.get("erased", {}).items()]
    lines += [f"  held-out paraphrases still drawn, {k}: {rate_text(r)}" for k, r in rates.get("held_out", {}).items()]
    lines += [f"  other {k}s intact: {rate_text(r)}" for k, r in rates.get("other", {}).items()]
    lines += [f"  {k} kept on every image: {rate_text(r)}" for k, r in rates.get("other_attributes", {}).items()]
    lines.append(f"  toy FID: {result['toy_fid']:.2f}")
    return lines
