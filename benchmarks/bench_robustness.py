"""Robustness of an erasure on the toy model: how often attacks bring "triangle" back, ESD-x vs Receler.

Both erasures are made with their ``toy`` presets on the bundled toy model (ESD-x:
``erase(model, "esd", ["triangle"], preset="toy")``; Receler: ``preset="toy"``), then each is
attacked with :func:`erasekit.attacks.run_attack` on the triangle's canonical prompts, and the
toy classifier judges the generated images. The success rate is the share of attacked images
classified as a triangle (lower: more robust). Every attack gets the same budget, prompts and
seeds for both erasures, so the rates compare directly.

Attacks (``--attacks``):

``none``
    the erased model on the canonical prompts, unattacked (the erasure's own leak);
``paraphrase``
    the triangle's held-out paraphrases ("triangular shape", "pyramid"), no optimisation;
``soft-prompt``
    UnlearnDiffAtk's loss with the learned prefix embeddings kept (the strongest white-box
    attack here); its budget is ``--soft-steps`` AdamW steps over ``--soft-timesteps`` timesteps;
``closed-form``
    RECE's closed-form adversarial embedding; it needs an erasure of to_k/to_v weights, so it
    applies to ESD-x but not to Receler's added erasers (reported as n/a).

What it measured is in ``docs/toy-presets.md`` (Receler `toy`).

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_robustness.py
    python benchmarks/bench_robustness.py --seeds 0 1 2 --attacks soft-prompt --erasures runs/robustness
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

METHODS = ("esd", "receler")
ATTACK_CHOICES = ("none", "paraphrase", "soft-prompt", "closed-form")


def make_erasure(model, method: str, cache: Path | None):
    """The method's toy-preset erasure of "triangle" (loaded from ``cache`` when it is there)."""
    import erasekit

    path = cache / f"{method}-triangle-toy.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        return erasekit.Erasure.load(path), 0.0
    started = time.process_time()
    erasure = erasekit.erase(model, method, ["triangle"], preset="toy", progress=False)
    seconds = time.process_time() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        erasure.save(path)
    return erasure, seconds


def unattacked_rate(model, erasure, seed: int, prompts: int, samples: int) -> float:
    """Share of triangles the erased model draws for the canonical prompts (the ``none`` row)."""
    from erasekit.toy.evaluate import evaluate_toy, shape_prompts

    erasure.apply(model)
    try:
        result = evaluate_toy(model, shape_prompts(["triangle"], per_shape=prompts), samples_per_prompt=samples, seed=seed,
                              progress=False)
    finally:
        erasure.remove(model)
    return result["by_value"]["shape"]["triangle"]


def attack_rate(model, erasure, attack: str, seed: int, budget: dict) -> float | None:
    """The attack's success rate against ``erasure`` (None when the attack does not apply to it)."""
    from erasekit import ErasekitError
    from erasekit.attacks import run_attack

    try:
        return run_attack(model, [erasure], concept="triangle", attack=attack, budget=budget, seed=seed, progress=False)["success_rate"]
    except ErasekitError as error:
        if attack == "closed-form":
            return None
        raise


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--attacks", nargs="+", default=["none", "paraphrase", "soft-prompt", "closed-form"], choices=ATTACK_CHOICES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="attack seeds (noise, initial embeddings, images)")
    parser.add_argument("--prompts", type=int, default=4, help="canonical triangle prompts attacked per seed")
    parser.add_argument("--samples", type=int, default=4, help="images judged per attacked prompt")
    parser.add_argument("--soft-steps", type=int, default=100, help="soft-prompt: AdamW steps per prompt")
    parser.add_argument("--soft-timesteps", type=int, default=10, help="soft-prompt: timesteps walked (early stop after each)")
    parser.add_argument("--erasures", type=Path, default=None, help="folder to keep the two erasures in and reuse them from")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)

    import torch

    import erasekit

    print(f"robustness on the toy model, torch threads {torch.get_num_threads()}; seeds {args.seeds}; "
          f"{args.prompts} prompts x {args.samples} images per attack and seed")
    model = erasekit.load_model("toy")
    erasures = {}
    for method in METHODS:
        erasures[method], seconds = make_erasure(model, method, args.erasures)
        print(f"  {method} toy preset: {erasures[method].fingerprint}" + (f", erased in {seconds:.0f} s CPU" if seconds else " (cached)"))

    budgets = {
        "paraphrase": {"prompts": args.prompts, "samples": args.samples},
        "soft-prompt": {"prompts": args.prompts, "samples": args.samples, "steps": args.soft_steps, "timesteps": args.soft_timesteps},
        "closed-form": {"prompts": args.prompts, "samples": args.samples},
    }
    table: dict[str, dict[str, dict]] = {}
    for attack in args.attacks:
        table[attack] = {}
        for method in METHODS:
            rates, started = [], time.process_time()
            for seed in args.seeds:
                if attack == "none":
                    rates.append(unattacked_rate(model, erasures[method], seed, args.prompts, args.samples))
                else:
                    rates.append(attack_rate(model, erasures[method], attack, seed, budgets[attack]))
            applicable = [r for r in rates if r is not None]
            mean = sum(applicable) / len(applicable) if applicable else None
            table[attack][method] = {"per_seed": dict(zip(args.seeds, rates)), "mean": mean,
                                     "cpu_seconds": round(time.process_time() - started, 1)}
            shown = "n/a (does not apply)" if mean is None else (
                f"{mean:6.1%}  (" + ", ".join(f"seed {s}: {r:.0%}" for s, r in zip(args.seeds, rates)) + ")")
            print(f"  {attack:<12} {method:<8} triangle success rate {shown}  [{table[attack][method]['cpu_seconds']:.0f} s CPU]")

    print("\nattack        ESD-x    Receler   (share of attacked images classified as a triangle; lower is more robust)")
    for attack, row in table.items():
        cells = [f"{row[m]['mean']:7.1%}" if row[m]["mean"] is not None else "    n/a" for m in METHODS]
        print(f"{attack:<12} {cells[0]}  {cells[1]}")
    if args.json is not None:
        from erasekit.utils import write_json

        write_json(args.json, {"seeds": args.seeds, "prompts": args.prompts, "samples": args.samples, "budgets": budgets,
                               "erasures": {m: e.fingerprint for m, e in erasures.items()}, "table": table})


if __name__ == "__main__":
    main()
