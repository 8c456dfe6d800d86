"""Every method's toy preset on every toy concept: erase, then measure with the toy protocol.

    python benchmarks/sweep_toy.py                                # 5 methods x 16 concepts
    python benchmarks/sweep_toy.py --methods uce,rece --concepts triangle,red,stripes
    python benchmarks/sweep_toy.py --report-only                  # rewrite the tables from the cells

For each method (``--preset``, default ``toy``) and each concept (the 6 shapes, 6 colours and 4
styles) it erases the concept from the bundled toy model and measures, with paired seeds (the same
noise for the unerased model and every erasure):

* erased: how often prompts naming the concept still draw it;
* other values: accuracy on the other values of its attribute (locality);
* other attributes: accuracy on the attributes not erased, on every image (does erasing a colour
  hurt shapes?);
* held-out: how often held-out paraphrases still draw it;
* toy FID, and the seconds the erasure took.

Every rate is kept with its image count and 95% Wilson interval. Each cell is one JSON file in
``OUT/cells/``, keyed on everything that determines it (method, config, concept, evaluation
settings, the resolver's targets, model weights, erasekit version): a rerun skips finished cells and refuses a folder whose
cells were made with other settings. ``OUT/sweep.json`` and ``OUT/sweep.md`` hold the tables and,
per method, the summary the toy presets are held to: erased ≤ 10% on average and ≤ 20% on the worst
concept; the other values within 5 points of the unerased model on average and 10 on the worst;
the other attributes within 5 points.

Image counts (defaults): 16 prompts x 4 samples naming the concept (64 images), 8 prompts x 4
samples per other value (96 images for a style's 3 others, 160 for a shape's or colour's 5), held-out
paraphrases 4 per word x 4 samples. Run with one thread per process (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

import erasekit
from erasekit.errors import ErasekitError
from erasekit.eval.protocols import get_protocol
from erasekit.eval.stats import rate_record
from erasekit.eval.toy import evaluate_toy_protocol
from erasekit.methods import METHODS, build_config
from erasekit.toy import world
from erasekit.toy.targets import resolve_toy_targets
from erasekit.training import weights_digest
from erasekit.utils import write_json, write_text

CONCEPTS = list(world.SHAPES) + list(world.COLOR_NAMES) + list(world.STYLES)
TARGETS = {"erased_mean": 0.10, "erased_worst": 0.20, "other_drop_mean": 0.05, "other_drop_worst": 0.10,
           "other_attributes_drop": 0.05}


def protocol_for(args):
    return replace(get_protocol("toy"), samples_per_prompt=args.samples, prompts_per_concept=args.prompts_per_concept,
                   prompts_per_other_value=args.prompts_per_other, held_out_per_word=args.held_out_per_word, seed=args.seed)


def cell_key(method: str, config: dict | None, concept: str, protocol, weights: str) -> str:
    """Everything a cell depends on, the resolver's targets (prompts, guides, kept captions) included."""
    parts = [method, config, concept, asdict(protocol), weights, erasekit.__version__]
    if config is not None:  # the unerased model's cells do not depend on the targets
        # (word is left out where it is the concept, its default, so cells made before it existed keep their keys)
        parts.append([{k: v for k, v in asdict(t).items() if k != "word" or v != t.concept} for t in resolve_toy_targets([concept])])
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def measure(model, concept: str, protocol) -> dict:
    result = evaluate_toy_protocol(model, [concept], protocol=protocol)
    rates = result["rates"]
    attribute, value = world.parse_concept(concept)
    return {
        "erased": rates["erased"][value], "held_out": rates["held_out"][value], "other": rates["other"][attribute],
        "other_by_value": rates["other_by_value"][attribute], "other_attributes": rates["other_attributes"],
        "toy_fid": result["toy_fid"], "images": result["images"],
    }


def finished_cell(path: Path, key: str, overwrite: bool) -> dict | None:
    """The cell at ``path`` if it was made with ``key``; None if it is to be made; a cell of other settings is refused."""
    if not path.is_file():
        return None
    cell = json.loads(path.read_text())
    if cell.get("key") == key:
        return cell
    if not overwrite:
        raise ErasekitError(f"{path} was made with other settings (another preset or variant, protocol, budgets, model or "
                            "erasekit); pass --overwrite to make it again, or choose another --out")
    return None


def run_cell(model, method: str, concept: str, protocol, args, weights: str) -> dict:
    path = Path(args.out) / "cells" / f"{method}-{concept}.json"
    kind = world.parse_concept(concept)[0]  # (the preset's layer for the concept's kind, if it has one)
    config = None if method == "original" else asdict(build_config(method, args.preset, {}, kind=kind))
    key = cell_key(method, config, concept, protocol, weights)
    cell = finished_cell(path, key, args.overwrite)
    if cell is not None:
        return cell
    torch.manual_seed(args.erase_seed)
    seconds, erasure = 0.0, None
    if method != "original":
        start = time.perf_counter()
        erasure = erasekit.erase(model, method, [concept], preset=args.preset, progress=False)
        seconds = time.perf_counter() - start
        erasure.apply(model)
    try:
        cell = {"key": key, "method": method, "concept": concept, "preset": args.preset if erasure else None,
                "seconds": round(seconds, 1), **measure(model, concept, protocol)}
    finally:
        if erasure is not None:
            erasure.remove(model)
    write_json(path, cell)
    return cell


def _pct(record: dict) -> str:
    return f"{record['rate']:.0%} ({record['shown']}/{record['n']})"


def _interval(record: dict) -> str:
    low, high = record["ci95"]
    return f"{record['rate']:.0%} [{low:.0%}, {high:.0%}] of {record['n']}"


def summarise(cells: dict, methods: list[str], concepts: list[str]) -> dict:
    """Per method: erased mean/worst, other-values drop mean/worst and the worst other-attribute drop vs the unerased model."""
    summary = {}
    for method in methods:
        rows = [(c, cells[(method, c)], cells[("original", c)]) for c in concepts if (method, c) in cells and ("original", c) in cells]
        if not rows:
            continue
        erased = [cell["erased"]["rate"] for _, cell, _ in rows]
        drops = [base["other"]["rate"] - cell["other"]["rate"] for _, cell, base in rows]
        attribute_drops = [base["other_attributes"][a]["rate"] - cell["other_attributes"][a]["rate"]
                           for _, cell, base in rows for a in cell["other_attributes"]]
        pooled = [sum(cell["erased"][k] for _, cell, _ in rows) for k in ("shown", "n")]
        entry = {
            "concepts": len(rows),
            "erased_mean": sum(erased) / len(erased), "erased_worst": max(erased),
            "erased_worst_concept": rows[erased.index(max(erased))][0], "erased_pooled": rate_record(*pooled),
            "other_drop_mean": sum(drops) / len(drops), "other_drop_worst": max(drops),
            "other_drop_worst_concept": rows[drops.index(max(drops))][0],
            "other_attributes_drop_worst": max(attribute_drops) if attribute_drops else 0.0,
            "seconds_mean": sum(cell["seconds"] for _, cell, _ in rows) / len(rows),
        }
        entry["meets"] = {name: entry[name if name != "other_attributes_drop" else "other_attributes_drop_worst"] <= bound
                          for name, bound in TARGETS.items()}
        summary[method] = entry
    return summary


def markdown(cells: dict, summary: dict, methods: list[str], concepts: list[str], protocol, command: str) -> str:
    lines = [f"# Toy sweep: {', '.join(methods)} x {len(concepts)} concepts", "",
             f"Made by `{command}`; protocol toy v{protocol.version}, seed {protocol.seed}, "
             f"{protocol.samples_per_prompt} samples a prompt. Each cell: rate (shown/images).", ""]
    for title, pick in (("Erased concept still drawn (lower is better)", lambda c: c["erased"]),
                        ("Other values of its attribute drawn right (locality)", lambda c: c["other"]),
                        ("Held-out paraphrases still drawn", lambda c: c["held_out"])):
        lines += [f"## {title}", "", "| method | " + " | ".join(concepts) + " |", "|---" * (len(concepts) + 1) + "|"]
        for method in ["original", *methods]:
            lines.append(f"| {method} | " + " | ".join(_pct(pick(cells[(method, c)])) if (method, c) in cells else "–"
                                                     for c in concepts) + " |")
        lines.append("")
    lines += ["## Other attributes kept (accuracy on the attributes not erased, every image)", "",
              "| method | " + " | ".join(concepts) + " |", "|---" * (len(concepts) + 1) + "|"]
    for method in ["original", *methods]:
        row = []
        for c in concepts:
            cell = cells.get((method, c))
            row.append("–" if cell is None else " ".join(f"{a[:2]} {r['rate']:.0%}" for a, r in cell["other_attributes"].items()))
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    lines += ["", "## Against the targets", "",
              "| method | erased mean | erased worst | others' drop mean | others' drop worst | other attributes' worst drop | s per erasure | meets all |",
              "|---|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        lines.append(f"| {method} ({s['concepts']} of {len(concepts)} concepts) | {s['erased_mean']:.1%} | {s['erased_worst']:.1%} ({s['erased_worst_concept']}) | "
                     f"{s['other_drop_mean']:+.1%} | {s['other_drop_worst']:+.1%} ({s['other_drop_worst_concept']}) | "
                     f"{s['other_attributes_drop_worst']:+.1%} | {s['seconds_mean']:.0f} | "
                     f"{'yes' if all(s['meets'].values()) else 'no: ' + ', '.join(k for k, v in s['meets'].items() if not v)} |")
    lines += ["", "Targets: erased ≤ 10% mean, ≤ 20% worst; others' drop ≤ 5 points mean, ≤ 10 worst; other attributes ≤ 5 points.",
              "Drops are the unerased model's accuracy minus the erased model's on the same images' seeds (positive = worse)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all five)")
    parser.add_argument("--concepts", default=",".join(CONCEPTS), help="comma-separated toy concepts (default: all 16)")
    parser.add_argument("--preset", default="toy")
    parser.add_argument("--out", default="sweep-toy")
    parser.add_argument("--seed", type=int, default=1, help="evaluation seed (presets were tuned on seed 0)")
    parser.add_argument("--erase-seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=4, help="images a prompt")
    parser.add_argument("--prompts-per-concept", type=int, default=16)
    parser.add_argument("--prompts-per-other", type=int, default=8)
    parser.add_argument("--held-out-per-word", type=int, default=4)
    parser.add_argument("--overwrite", action="store_true", help="remake cells made with other settings")
    parser.add_argument("--report-only", action="store_true", help="rewrite sweep.json/sweep.md from the finished cells")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    try:
        for method in methods:
            if method not in METHODS:
                raise ErasekitError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
            build_config(method, args.preset, {})
        for concept in concepts:
            world.parse_concept(concept)
        protocol = protocol_for(args)
        model = erasekit.load_model("toy")
        weights = weights_digest(dict(model.unet.named_parameters()))
        cells = {}
        todo = [("original", c) for c in concepts] + [(m, c) for m in methods for c in concepts]
        for index, (method, concept) in enumerate(todo, 1):
            path = Path(args.out) / "cells" / f"{method}-{concept}.json"
            if args.report_only:
                if path.is_file():
                    cell = json.loads(path.read_text())
                    cells[(method, concept)] = cell
                continue
            start = time.perf_counter()
            cell = run_cell(model, method, concept, protocol, args, weights)
            cells[(method, concept)] = cell
            print(f"[{index}/{len(todo)}] {method:8s} {concept:12s} erased {_interval(cell['erased'])}, "
                  f"others {_interval(cell['other'])} ({time.perf_counter() - start:.0f} s)", flush=True)
    except ErasekitError as error:
        print(f"sweep_toy: error: {error}", file=sys.stderr)
        return 2
    summary = summarise(cells, methods, concepts)
    command = "python benchmarks/sweep_toy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    write_json(out / "sweep.json", {"protocol": asdict(protocol), "preset": args.preset, "command": command, "summary": summary,
                                    "cells": [cells[k] for k in sorted(cells)]})
    write_text(out / "sweep.md", markdown(cells, summary, methods, concepts, protocol, command))
    print(markdown(cells, summary, methods, concepts, protocol, command).split("## Against the targets")[1])
    print(f"wrote {out / 'sweep.md'} and {out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
