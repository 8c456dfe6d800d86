"""Success rate and time of every attack on the bundled toy model, unerased and with the triangle erased by UCE.

    python benchmarks/bench_attacks.py            # default-ish budgets (a few hours on one CPU core)
    python benchmarks/bench_attacks.py --medium   # 4 prompts, a few hundred steps (about 30 minutes)
    python benchmarks/bench_attacks.py --quick    # the fast tests' budgets, 4 prompts (about 10 minutes)
    python benchmarks/bench_attacks.py --attack p4d --attack closed-form

Concept: "triangle"; erasure: ``erase(model, "uce", ["triangle"], preset="toy")``; prompts: the
toy defaults (8 canonical triangle prompts; the 8 held-out paraphrases for ``paraphrase``); judge:
the toy classifier. Each attack is run twice, against the unerased model (every attack should
succeed on nearly all prompts) and against the erasure (the optimising attacks should bring the
triangle back more often than the paraphrase baseline). The spec's full defaults (2000
UnlearnDiffAtk steps, 3000 P4D steps, Ring-A-Bell's 200 x 3000 genetic search, 5000 textual-
inversion steps) take hours per prompt on a CPU; the budgets below are scaled down and printed.
"""

from __future__ import annotations

import argparse
import time

import erasekit
from erasekit.attacks import ATTACKS, run_attack

# default-ish budgets: the spec's settings with fewer optimisation steps
BUDGETS = {
    "paraphrase": {},
    "closed-form": {},
    "soft-prompt": {"steps": 200, "timesteps": 20},
    "unlearndiff": {"steps": 200, "timesteps": 20},
    "p4d": {"steps": 300, "check_every": 50},
    "ring-a-bell": {"population": 64, "generations": 40},
    "ring-a-bell-soft": {"variant": "soft"},
    "textual-inversion": {"steps": 300, "images": 16, "gradient_accumulation": 1},
}
MEDIUM = {
    "paraphrase": {},
    "closed-form": {},
    "soft-prompt": {"steps": 80, "timesteps": 8},
    "unlearndiff": {"steps": 80, "timesteps": 8},
    "p4d": {"steps": 100, "check_every": 50},
    "ring-a-bell": {"population": 32, "generations": 10},
    "ring-a-bell-soft": {"variant": "soft"},
    "textual-inversion": {"steps": 100, "images": 8, "gradient_accumulation": 1},
}
QUICK = {
    "paraphrase": {},
    "closed-form": {},
    "soft-prompt": {"steps": 16, "timesteps": 4, "early_stop": False},
    "unlearndiff": {"steps": 16, "timesteps": 4, "early_stop": False},
    "p4d": {"steps": 16, "check_every": 0},
    "ring-a-bell": {"population": 16, "generations": 4},
    "ring-a-bell-soft": {"variant": "soft"},
    "textual-inversion": {"steps": 10, "images": 4, "gradient_accumulation": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets and 4 prompts")
    parser.add_argument("--medium", action="store_true", help="medium budgets and 4 prompts")
    parser.add_argument("--attack", action="append", help="run only these (repeat); names as in BUDGETS")
    parser.add_argument("--samples", type=int, default=2, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    budgets = QUICK if args.quick else MEDIUM if args.medium else BUDGETS
    names = args.attack or list(budgets)
    model = erasekit.load_model("toy")
    erasure = erasekit.erase(model, "uce", ["triangle"], preset="toy", progress=False)
    print(f"{'attack':<20} {'unerased':>9} {'UCE-erased':>11} {'seconds':>8}  budget")
    for name in names:
        attack = "ring-a-bell" if name == "ring-a-bell-soft" else name
        if attack not in ATTACKS:
            raise SystemExit(f"unknown attack {name!r}; choose from {', '.join(budgets)}")
        budget = {"samples": args.samples, **budgets[name]}
        if args.quick or args.medium:
            budget["prompts"] = 4
        rates, started = [], time.perf_counter()
        for erasures in ([], [erasure]):
            result = run_attack(model, erasures, "triangle", attack=attack, budget=budget, seed=args.seed, progress=False)
            rates.append(f"{result['success_rate']:.0%} ({sum(s for p in result['per_prompt'] for s in p['successes'])}/{result['n']})")
        seconds = time.perf_counter() - started
        print(f"{name:<20} {rates[0]:>9} {rates[1]:>11} {seconds:8.0f}  {budgets[name]}", flush=True)


if __name__ == "__main__":
    main()
