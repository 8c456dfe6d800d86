"""``erasekit demo``: the guided tour on the bundled toy model, offline, on a CPU.

It erases one shape ("triangle") with every method this version implements (each with
its ``toy`` preset), measures with the toy classifier how often the erased shape and the
other shapes are still drawn, on the training names and on held-out paraphrases, and
writes ``OUT/report.md`` with a table and before/after image grids.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from erasekit.methods import METHODS, available_methods, erase
from erasekit.models.loading import load_model
from erasekit.toy import world
from erasekit.toy.evaluate import evaluate_toy, held_out_prompts, image_grid, shape_prompts, write_json

DEMO_CONCEPT = "triangle"
PLANNED = "attacks (paraphrase, soft-prompt) and the HTML benchmark report arrive with their issues"


def _grid(model, path: Path, seeds: list[int]) -> None:
    prompts = [world.canonical_prompt(s, c, "plain") for s, c in zip(world.SHAPES, world.COLOR_NAMES)]
    images = torch.cat([model.generate([p] * len(seeds), seeds) for p in prompts])
    image_grid(images, rows=len(prompts), labels=prompts).save(path)


def _scores(model, quick: bool) -> dict:
    per_shape = 1 if quick else 3
    main = evaluate_toy(model, shape_prompts(per_shape=per_shape), samples_per_prompt=2, progress=False)
    held = evaluate_toy(model, held_out_prompts(shapes=[DEMO_CONCEPT], per_word=per_shape // 2 or 1), samples_per_prompt=2, progress=False)
    shapes = main["by_value"]["shape"]
    others = [v for k, v in shapes.items() if k != DEMO_CONCEPT]
    return {
        "erased": shapes.get(DEMO_CONCEPT),
        "others": sum(others) / len(others),
        "held_out": held["by_value"]["shape"].get(DEMO_CONCEPT),
        "color": main["overall"]["color"],
        "style": main["overall"]["style"],
    }


def run_demo(out: str | Path = "demo-output", quick: bool = False) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHODS if m in available_methods()]
    print(f"erasekit demo: erase {DEMO_CONCEPT!r} from the bundled toy model with: {', '.join(methods) or 'no method yet'}")
    print(f"(still to come in this demo: {', '.join(sorted(set(METHODS) - set(methods))) or 'nothing'}; {PLANNED})")
    torch.manual_seed(0)
    model = load_model("toy")
    seeds = [0, 1, 2, 3]
    rows = []
    print("scoring the unerased model ...", flush=True)
    _grid(model, out / "before.png", seeds)
    rows.append({"method": "none (original)", "seconds": 0.0, **_scores(model, quick)})
    for method in methods:
        print(f"erasing with {method} ...", flush=True)
        start = time.perf_counter()
        erasure = erase(model, method, [DEMO_CONCEPT], preset="toy")
        seconds = time.perf_counter() - start
        erasure.save(out / f"{method}-{DEMO_CONCEPT}.safetensors")
        erasure.apply(model)
        _grid(model, out / f"after-{method}.png", seeds)
        rows.append({"method": method, "seconds": round(seconds, 1), **_scores(model, quick)})
        erasure.remove(model)
        r = rows[-1]
        print(f"  {method}: {DEMO_CONCEPT} drawn {r['erased']:.0%} (was {rows[0]['erased']:.0%}), other shapes {r['others']:.0%} (was {rows[0]['others']:.0%})")
    write_json({"concept": DEMO_CONCEPT, "rows": rows}, out / "results.json")
    lines = [
        f"# erasekit demo: erasing '{DEMO_CONCEPT}' from the toy model", "",
        "Accuracy of the toy classifier on generated images: how often the shape asked for is drawn.", "",
        f"| method | {DEMO_CONCEPT} (erased) | other shapes | {DEMO_CONCEPT}, held-out paraphrases | color | style | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['erased']:.0%} | {r['others']:.0%} | {r['held_out']:.0%} | {r['color']:.0%} | {r['style']:.0%} | {r['seconds']} |")
    lines += ["", "## Images (one row per shape; the erased one is the third)", "", "Before:", "", "![before](before.png)", ""]
    lines += [f"After {m}:\n\n![after {m}](after-{m}.png)\n" for m in methods]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"\nreport: {(out / 'report.md').resolve()}")
    return out / "report.md"


if __name__ == "__main__":
    run_demo()
