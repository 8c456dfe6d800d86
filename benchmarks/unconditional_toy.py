"""Does a toy model still know a shape? The shapes it draws from the empty prompt.

    python benchmarks/unconditional_toy.py --shape triangle --models toy,robustness-toy/retrained/triangle/model
    python benchmarks/unconditional_toy.py --shape triangle --models toy --erasures triangle-adv.safetensors

Each model (a toy model folder, or ``toy`` for the bundled one; each ``--erasures`` file is measured
applied to the first model) samples ``--samples`` images from the empty prompt, without guidance
(``--guidance 1``), from the same seeds, and the toy classifier reads their shapes. An erasure that
only cuts the words' path to the shape leaves the unconditional count where it was; a model that
never learned the shape draws it only as often as the classifier errs. Prints, per model, the count
of each shape and the rate of ``--shape`` with its 95% Wilson interval.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import erasekit
from erasekit.errors import ErasekitError
from erasekit.eval.stats import rate_record
from erasekit.toy import world
from erasekit.toy.classifier import load_classifier


def shape_counts(model, samples: int, seed: int, guidance: float, batch_size: int = 96) -> Counter:
    classifier = load_classifier()
    counts: Counter = Counter()
    for start in range(0, samples, batch_size):
        seeds = list(range(seed + start, seed + min(samples, start + batch_size)))
        images = model.generate([""] * len(seeds), seeds, guidance=guidance)
        counts.update(classifier.predict(images)["shape"])
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, help=f"the shape whose rate is reported, of: {', '.join(world.SHAPES)}")
    parser.add_argument("--models", default="toy", help="comma-separated toy model folders (toy: the bundled model)")
    parser.add_argument("--erasures", default="", help="comma-separated erasure files, each measured on the first model")
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--seed", type=int, default=1000, help="the first sample's seed")
    parser.add_argument("--guidance", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        if args.shape not in world.SHAPES:
            raise ErasekitError(f"unknown shape {args.shape!r}; choose from {', '.join(world.SHAPES)}")
        if args.samples < 1:
            raise ErasekitError("--samples must be at least 1")
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not models:
            raise ErasekitError("--models names no model; give at least one folder, or toy")
        erasures = [erasekit.Erasure.load(path.strip()) for path in args.erasures.split(",") if path.strip()]
        loaded = [(name, erasekit.load_model(name)) for name in models]
        for erasure in erasures:
            erasure.check_base(loaded[0][1])  # made for another model: refused before any image is drawn
    except ErasekitError as error:
        print(f"unconditional_toy: error: {error}", file=sys.stderr)
        return 2
    rows = [(name, model, None) for name, model in loaded]
    rows += [(f"{models[0]} + {erasure.method} erasure", loaded[0][1], erasure) for erasure in erasures]
    print(f"shapes drawn from the empty prompt: {args.samples} seeds from {args.seed}, guidance {args.guidance}\n")
    print(f"| model | {args.shape} (rate; 95% interval) | " + " | ".join(world.SHAPES) + " |")
    print("|---|---|" + "---|" * len(world.SHAPES))
    for name, model, erasure in rows:
        if erasure is not None:
            erasure.apply(model)
        try:
            counts = shape_counts(model, args.samples, args.seed, args.guidance)
        finally:
            if erasure is not None:
                erasure.remove(model)
        record = rate_record(counts[args.shape], args.samples)
        low, high = record["ci95"]
        print(f"| {name} | {record['rate']:.0%} ({record['shown']}/{record['n']}; {low:.0%}-{high:.0%}) | "
              + " | ".join(str(counts[s]) for s in world.SHAPES) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
