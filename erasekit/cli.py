"""The ``erasekit`` command line. It parses arguments and calls the library; it does no math.

Bad input exits with status 2 and one line, ``erasekit: error: <problem>; <fix>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from erasekit.errors import ErasekitError


def _parse_sets(pairs: list[str] | None) -> dict[str, str]:
    overrides = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ErasekitError(f"--set {pair!r} is not key=value; write e.g. --set learning_rate=1e-4")
        key, value = pair.split("=", 1)
        overrides[key.strip()] = value.strip()
    return overrides


def _load(args):
    from erasekit.erasure import apply_erasures
    from erasekit.models.loading import load_model

    model = load_model(args.model, device=getattr(args, "device", None), dtype=getattr(args, "dtype", None))
    apply_erasures(model, getattr(args, "erasure", None) or [], force=getattr(args, "force", False))
    return model


# ------------------------------------------------------------------ commands
def cmd_erase(args) -> None:
    import torch

    from erasekit.methods import build_config, erase

    config = build_config(args.method, args.preset, _parse_sets(args.set))  # fail on bad --set before loading
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ErasekitError(f"{out} already exists; pass --overwrite or choose another --out")
    torch.manual_seed(args.seed)
    model = _load(args)
    start = time.perf_counter()
    erasure = erase(model, args.method, args.concept, preserve=args.preserve or [], config=config)
    erasure.info.setdefault("seconds", round(time.perf_counter() - start, 2))
    erasure.info.setdefault("seed", args.seed)
    path = erasure.save(out)
    print(f"{erasure}\nsaved to {path}")


def cmd_generate(args) -> None:
    from erasekit.eval.generate import generate_to_folder, read_prompts

    prompts = read_prompts(args.prompts, args.prompt, seed=args.seed, samples_per_prompt=args.samples_per_prompt, guidance=args.guidance)
    model = _load(args)
    written = generate_to_folder(model, prompts, args.out, batch_size=args.batch_size, steps=args.steps)
    print(f"{written} new images in {args.out} ({len(prompts)} requested)")


def cmd_toy_eval(args) -> None:
    from erasekit.toy.evaluate import evaluate_toy, resolve_prompts, summary_lines, write_json

    prompts = resolve_prompts(args.prompts)
    model = _load(args)
    result = evaluate_toy(model, prompts, samples_per_prompt=args.samples_per_prompt, seed=args.seed, guidance=args.guidance, steps=args.steps)
    print("\n".join(summary_lines(result)))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def cmd_toy_grid(args) -> None:
    from erasekit.toy import world
    from erasekit.toy.evaluate import toy_grid

    prompts = args.prompt or [world.canonical_prompt(s, c, st) for s, c, st in zip(world.SHAPES, world.COLOR_NAMES, world.STYLES * 2)]
    model = _load(args)
    path = toy_grid(model, prompts, list(range(args.seed, args.seed + args.seeds)), args.out, guidance=args.guidance, steps=args.steps)
    print(f"wrote {path}")


def cmd_toy_train(args) -> None:
    from erasekit.toy.train import ToyTrainConfig, train_toy_model

    config = ToyTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, checkpoint_every=args.checkpoint_every)
    folder = train_toy_model(args.out, config, resume=args.resume)
    print(f"toy model written to {folder}; load it with erasekit.load_model({str(folder)!r})")


def cmd_toy_train_classifier(args) -> None:
    from erasekit.toy.classifier import accuracy_on_fresh_images, train_classifier

    model = train_classifier(args.out, steps=args.steps, seed=args.seed)
    print(f"classifier written to {args.out}; accuracy on fresh images: {accuracy_on_fresh_images(model)}")


def cmd_not_yet(name: str, issue: str):
    def run(args) -> None:
        raise ErasekitError(f"'erasekit {name}' is not implemented in this version yet ({issue}); see the README for what works today")

    return run


def cmd_demo(args) -> None:
    from erasekit.demo import run_demo

    run_demo(out=args.out, quick=args.quick)


# -------------------------------------------------------------------- parser
def _model_arguments(p, erasures: bool = True) -> None:
    p.add_argument("--model", default="toy", help="'toy' (default), a diffusers folder or a hub id")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    p.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    if erasures:
        p.add_argument("--erasure", action="append", help="an erasure .safetensors to apply first (repeat to stack)")
        p.add_argument("--force", action="store_true", help="apply erasures even if they were made for another base model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="erasekit", description="Erase concepts from text-to-image diffusion models, evaluate and attack the result.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("erase", help="erase concepts with one method and save the erasure file")
    _model_arguments(p, erasures=False)
    p.add_argument("--method", required=True, help="esd, uce, rece, receler or cpe")
    p.add_argument("--concept", action="append", required=True, help="a concept to erase (repeat for several)")
    p.add_argument("--preserve", action="append", help="a concept to keep intact (repeat for several)")
    p.add_argument("--out", required=True, help="the erasure file to write (.safetensors)")
    p.add_argument("--preset", default=None, help="a named preset of the method's config (every method has 'paper' and 'toy')")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config field (repeat)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=cmd_erase)

    p = sub.add_parser("generate", help="generate images for prompts, skipping images that already exist")
    _model_arguments(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts", help="a CSV (prompt column; optional seed, guidance) or a text file, one prompt a line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="base seed for prompts without their own")
    p.add_argument("--samples-per-prompt", type=int, default=1)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(run=cmd_generate)

    for name, issue, text in [
        ("evaluate", "the evaluation issue", "score generated images with a named protocol"),
        ("attack", "the red-teaming issue", "attack an erased model"),
        ("bench", "the benchmark issue", "run methods x concepts x attacks on the toy model and write a report"),
    ]:
        p = sub.add_parser(name, help=f"{text} (not implemented yet)")
        p.set_defaults(run=cmd_not_yet(name, issue))

    p = sub.add_parser("demo", help="the guided tour on the bundled toy model")
    p.add_argument("--out", default="demo-output", help="where the demo writes its files")
    p.add_argument("--quick", action="store_true", help="fewer images, for a smoke test")
    p.set_defaults(run=cmd_demo)

    toy = sub.add_parser("toy", help="the toy world: train, evaluate and look at the toy model").add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)
    p = toy.add_parser("eval", help="generate over a prompt set and score each attribute with the toy classifier")
    _model_arguments(p)
    p.add_argument("--prompts", default=None, help="all (default: every shape x color x style), shapes, held-out, synonyms, or a CSV prompt,shape,color,style")
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--json", default=None, help="write the full result as JSON here")
    p.set_defaults(run=cmd_toy_eval)

    p = toy.add_parser("grid", help="write a PNG grid of prompts by seeds")
    _model_arguments(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat); default: one per shape")
    p.add_argument("--seeds", type=int, default=6, help="columns")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="toy-grid.png")
    p.set_defaults(run=cmd_toy_grid)

    p = toy.add_parser("train", help="train the toy text-to-image model (resumable)")
    p.add_argument("--out", required=True, help="run folder (checkpoint/ and model/ are written inside)")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.set_defaults(run=cmd_toy_train)

    p = toy.add_parser("train-classifier", help="train the toy classifier")
    p.add_argument("--out", default="toy-classifier.safetensors")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_toy_train_classifier)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ErasekitError as error:
        print(f"erasekit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erasekit: interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
