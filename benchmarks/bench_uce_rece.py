"""Time UCE and RECE on an SD 1.4-shaped UNet (random weights, random 77 x 768 text states).

    python benchmarks/bench_uce_rece.py
    python benchmarks/bench_uce_rece.py --toy   # erasure, locality and robustness on the bundled toy model

Builds the UNet from Stable Diffusion 1.4's config (16 cross-attention layers, 32 to_k/to_v
matrices) and skips the text encoder: the methods' row-level functions take text states
directly. Prints the seconds of

* UCE, one concept (legacy rows, "" preserved);
* RECE: the UCE edit and 3 rounds, no validation;
* UCE, 100 concepts in one solve.

Targets on one CPU core: < 5 s, < 15 s and < 60 s. Timings include building the
:class:`erasekit.Erasure`, not encoding prompts (there is no text encoder here).

``--toy`` erases "triangle" with the ``toy`` presets of UCE and RECE from the bundled toy model
and prints, for the unerased model and each erasure (paired seeds: the same noise for each), how
often the triangle is still drawn: for 16 prompts naming it, for its 8 held-out paraphrases (twice
each) and under the closed-form embedding attack (RECE's own, :mod:`erasekit.attacks.closed_form`,
on its 8 default prompts), each with ``--samples`` images a prompt, and the accuracy on every other
shape (16 prompts each). "kv" is how much of the triangle's keys and values (relative to a generic
shape's) the closed-form attack brings back (1 = all). It then erases the striped style with both
and prints shape, colour and style accuracy.

Last it prints why no erasure that keeps the other shapes can close the closed-form attack on the
toy model: restricted to the leading principal directions of the other shapes' caption embeddings
(which such an erasure must leave nearly in place), the attack still brings back most of the
triangle's keys and values. RECE lowers the attack's success; in the toy it cannot end it.

What it measured is in ``docs/toy-presets.md`` (UCE `toy` and RECE `toy`) and the README.
"""

from __future__ import annotations

import time

import torch

from erasekit import Erasure
from erasekit.methods import rece, uce
from sd14 import DIM, TOKENS, sd14_shaped_model


def random_states(count: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(count, TOKENS, DIM, generator=generator)


def uce_solution(model, concept_states, concept_lasts, guide_states, guide_last, preserve_states, config):
    """What ``uce.uce_edit`` does after encoding: the rows and one float64 solve."""
    E, G, P = uce.uce_rows_from_states(
        concept_states, concept_lasts, guide_states.expand(len(concept_states), -1, -1), [guide_last] * len(concept_states),
        preserve_states, [0] * len(preserve_states), config.token_mode,
    )
    preserve_scale = uce.resolve_preserve_scale(config.preserve_scale, config.token_mode, len(preserve_states))
    original = uce.key_value_weights(model, original=True, edit_keys=config.edit_keys)
    return uce.uce_solve(E, G, P, config.lamb, config.erase_scale, preserve_scale), original


def uce_erasure(model, *states_and_lasts, config) -> Erasure:
    """What ``uce.erase`` does after encoding: the solve, the deltas, the Erasure."""
    solution, original = uce_solution(model, *states_and_lasts, config)
    return Erasure.from_deltas(model, "uce", ["concept"], {}, uce.uce_deltas(original, solution))


def rece_erasure(model, concept_states, guide_states, preserve_states, config: rece.RECEConfig) -> Erasure:
    """What ``rece.erase`` does after encoding: the UCE solve, the rounds, the deltas, the Erasure."""
    solution, original = uce_solution(model, concept_states, [1], guide_states, 0, preserve_states, config.uce_config())
    retain_rows = preserve_states.reshape(-1, DIM)
    deltas, info = rece.rece_rounds(original, solution.transform(), concept_states, guide_states, retain_rows, config)
    return Erasure.from_deltas(model, "rece", ["concept"], {}, deltas, info)


def timed(label: str, target: float, function):
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    print(f"{label:<36} {seconds:7.2f} s   (target < {target:g} s)", flush=True)
    return result


def toy_report(samples: int, seed: int) -> None:
    """The toy-model measurements of ``--toy`` (paired seeds: the same noise before and after)."""
    import erasekit
    from erasekit.attacks import run_attack
    from erasekit.toy import world
    from erasekit.toy.evaluate import evaluate_toy, held_out_prompts, shape_prompts

    model = erasekit.load_model("toy")
    others = [shape for shape in world.SHAPES if shape != "triangle"]
    prompt_sets = {
        "named": shape_prompts(["triangle"], per_shape=16),
        "held-out": held_out_prompts(["triangle"], per_word=8),
        "others": shape_prompts(others, per_shape=16),
    }
    print(f"toy model, guidance {model.default_guidance}, {model.default_steps} DDIM steps, {samples} samples per prompt, seed {seed}")
    print(f"{'triangle':<10} {'erase s':>8} {'named':>7} {'held-out':>9} {'closed-form':>12} {'kv':>5}  other shapes")
    for method in (None, "uce", "rece"):
        erasures, seconds = [], 0.0
        if method:
            started = time.perf_counter()
            erasures = [erasekit.erase(model, method, ["triangle"], preset="toy", progress=False)]
            seconds = time.perf_counter() - started
        for erasure in erasures:
            erasure.apply(model)
        rates = {name: evaluate_toy(model, prompts, samples_per_prompt=samples, seed=seed, progress=False)["by_value"]["shape"]
                 for name, prompts in prompt_sets.items()}
        recovered = attack_recovery(model, "triangle")
        for erasure in erasures:
            erasure.remove(model)
        attack = run_attack(model, erasures, "triangle", attack="closed-form", budget={"samples": samples}, seed=seed, progress=False)
        kept = "  ".join(f"{shape} {rates['others'][shape]:.0%}" for shape in others)
        print(f"{method or 'none':<10} {seconds:8.1f} {rates['named']['triangle']:7.0%} {rates['held-out']['triangle']:9.0%} "
              f"{attack['success_rate']:12.0%} {recovered:5.2f}  {kept}", flush=True)

    prompts = shape_prompts(per_shape=8)
    before = evaluate_toy(model, prompts, samples_per_prompt=2, seed=seed, progress=False)
    for method in ("uce", "rece"):
        erasure = erasekit.erase(model, method, ["stripes"], preset="toy", progress=False)
        erasure.apply(model)
        after = evaluate_toy(model, prompts, samples_per_prompt=2, seed=seed, progress=False)
        erasure.remove(model)
        print(f"{method.upper()} erasing the striped style, all shapes' prompts: " + "  ".join(
            f"{a} {before['overall'][a]:.0%} -> {after['overall'][a]:.0%}" for a in ("shape", "color"))
            + f"  striped {before['by_value']['style']['stripes']:.0%} -> {after['by_value']['style']['stripes']:.0%}", flush=True)

    print("the closed-form attack restricted to the leading principal directions of the other shapes' captions:")
    for directions, recovered in kept_directions_bound(model, "triangle").items():
        print(f"    {directions:>3} directions: brings back {recovered:.2f} of the triangle's keys and values")


def _triangle_and_generic_states(model, concept: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The concept's canonical prompts (every colour and style) and, row by row, the mean of the same prompts
    with each other shape in its place (a generic shape), as float64 text states."""
    from erasekit.toy import world

    prompts = [world.canonical_prompt(concept, color, style) for color in world.COLOR_NAMES for style in world.STYLES]
    others = [world.SHAPE_NAMES[other][0] for other in world.SHAPES if other != concept]
    states = uce.encode_states(model, prompts).double()
    generic = uce.encode_guides(model, [tuple(world.replace_words(p, concept, other) for other in others) for p in prompts])
    return states, generic.double()


def _share_of_direction(gram: torch.Tensor, outputs: torch.Tensor, states: torch.Tensor, generic: torch.Tensor) -> float:
    """<x - g, c - g> / <c - g, c - g> in the metric of Σ W⁰ᵀW⁰: how much of the way from a generic shape's
    keys and values to the concept's the inputs x (already mapped into the original model's input space) go."""
    direction = (states - generic).reshape(-1, states.shape[-1])
    moved = (outputs - generic).reshape(-1, states.shape[-1])
    return float(((moved @ gram) * direction).sum() / ((direction @ gram) * direction).sum())


def attack_recovery(model, concept: str, regular_scale: float = 0.1) -> float:
    """How much of the concept's keys and values (relative to a generic shape's) the closed-form attack brings
    back on the model as it is (its erasures applied): 1 = all of it, 0 = a generic shape's."""
    edited = uce.key_value_weights(model, original=False)
    original = uce.key_value_weights(model, original=True)
    states, generic = _triangle_and_generic_states(model, concept)
    adversarial = rece.closed_form_adversarial_embedding(None, states, edited, original, regular_scale)
    # S with W' = W⁰ S for every matrix at once (exact for UCE and RECE edits): least squares on the stacked matrices
    stacked_original = torch.cat([w.double() for w in original.values()])
    stacked_edited = torch.cat([edited[name].double() for name in original])
    transform = torch.linalg.lstsq(stacked_original, stacked_edited).solution
    return _share_of_direction(rece.weight_gram(original), adversarial.double() @ transform.T, states, generic)


def kept_directions_bound(model, concept: str, counts=(25, 50, 100, 200), regular_scale: float = 0.1) -> dict[int, float]:
    """The closed-form attack's recovery when c' may only use the ``k`` leading principal directions of the
    other shapes' training-caption rows: an erasure that keeps those shapes must map these directions (nearly)
    to themselves, so whatever the attack brings back through them, it brings back from any such erasure."""
    from erasekit.toy import world

    states, generic = _triangle_and_generic_states(model, concept)
    dim = states.shape[-1]
    captions = [caption for other in world.SHAPES if other != concept for caption in world.training_captions("shape", other)]
    rows = uce.encode_states(model, captions).reshape(-1, dim).double()
    _, vectors = torch.linalg.eigh(rows.T @ rows)
    vectors = vectors.flip(1)  # leading directions first
    gram = rece.weight_gram(uce.key_value_weights(model, original=True))
    result = {}
    for count in counts:
        basis = vectors[:, :count]
        system = basis.T @ gram @ basis + regular_scale * torch.eye(count, dtype=torch.float64)
        coefficients = torch.linalg.solve(system, (states.reshape(-1, dim) @ gram @ basis).T).T
        result[count] = _share_of_direction(gram, (coefficients @ basis.T).reshape(states.shape), states, generic)
    return result


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="measure erasure, locality and robustness on the toy model instead")
    parser.add_argument("--samples", type=int, default=4, help="--toy: images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="--toy: evaluation seed")
    args = parser.parse_args()
    if args.toy:
        toy_report(args.samples, args.seed)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    started = time.perf_counter()
    model = sd14_shaped_model(with_scheduler=False)
    print(f"built the SD 1.4 UNet in {time.perf_counter() - started:.1f} s: {len(model.key_value_projections())} to_k/to_v matrices")
    generator = torch.Generator().manual_seed(0)
    concept, guide, empty = random_states(1, generator), random_states(1, generator)[0], random_states(1, generator)
    uce_config = rece.RECEConfig().uce_config()  # legacy rows, guide " ", "" preserved, λ 0.5

    timed("UCE, 1 concept", 5, lambda: uce_erasure(model, concept, [1], guide, 0, empty, config=uce_config))
    result = timed("RECE, UCE + 3 rounds, no validation", 15, lambda: rece_erasure(model, concept, guide, empty, rece.RECEConfig(epochs=3)))
    print(f"    adversarial residual before/after each round: {result.info['adversarial_residual_before']} / "
          f"{result.info['adversarial_residual_after']}")

    concepts = random_states(100, generator)
    lasts = [1 + i % 3 for i in range(100)]
    many = timed("UCE, 100 concepts in one solve", 60, lambda: uce_erasure(model, concepts, lasts, guide, 0, empty, config=uce_config))
    print(f"    {sum(TOKENS - n for n in lasts)} erased rows, {len(many.deltas)} matrices")


if __name__ == "__main__":
    main()
