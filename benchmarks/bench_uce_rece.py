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
and prints, for the unerased model and each erasure: how often the triangle is still drawn for
prompts naming it, for its held-out paraphrases and under the closed-form embedding attack
(RECE's own, :mod:`erasekit.attacks.closed_form`), and the accuracy on every other shape. It then
erases the striped style with UCE and prints shape and colour accuracy before and after.
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


def toy_report(samples: int) -> None:
    """The toy-model measurements of ``--toy`` (paired seeds: the same noise before and after)."""
    import erasekit
    from erasekit.attacks import run_attack
    from erasekit.eval.toy import evaluate_toy_protocol
    from erasekit.toy.evaluate import evaluate_toy, shape_prompts

    model = erasekit.load_model("toy")
    print(f"toy model, guidance {model.default_guidance}, {model.default_steps} DDIM steps, {samples} samples per prompt")
    print(f"{'triangle':<10} {'erase s':>8} {'named':>7} {'held-out':>9} {'closed-form':>12}  other shapes")
    for method in (None, "uce", "rece"):
        erasures, seconds = [], 0.0
        if method:
            started = time.perf_counter()
            erasures = [erasekit.erase(model, method, ["triangle"], preset="toy", progress=False)]
            seconds = time.perf_counter() - started
        for erasure in erasures:
            erasure.apply(model)
        result = evaluate_toy_protocol(model, ["triangle"], samples_per_prompt=samples)
        for erasure in erasures:
            erasure.remove(model)
        attack = run_attack(model, erasures, "triangle", attack="closed-form", budget={"samples": samples}, progress=False)
        others = "  ".join(f"{k} {v:.0%}" for k, v in result["other_by_value"]["shape"].items())
        print(f"{method or 'none':<10} {seconds:8.1f} {result['erased']['triangle']:7.0%} {result['held_out']['triangle']:9.0%} "
              f"{attack['success_rate']:12.0%}  {others}", flush=True)

    prompts = shape_prompts(per_shape=4)
    before = evaluate_toy(model, prompts, samples_per_prompt=samples, progress=False)["overall"]
    erasure = erasekit.erase(model, "uce", ["stripes"], preset="toy", progress=False)
    erasure.apply(model)
    after = evaluate_toy(model, prompts, samples_per_prompt=samples, progress=False)["overall"]
    erasure.remove(model)
    print("UCE erasing the striped style, all shapes' prompts: " + "  ".join(
        f"{a} {before[a]:.0%} -> {after[a]:.0%}" for a in ("shape", "color", "style")))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="measure erasure, locality and robustness on the toy model instead")
    parser.add_argument("--samples", type=int, default=4, help="--toy: images per prompt")
    args = parser.parse_args()
    if args.toy:
        toy_report(args.samples)
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
