"""The ``erasekit`` command line. It parses arguments and calls the library; it does no math.

Bad input exits with status 2 and one line, ``erasekit: error: <problem>; <fix>``.
"""

from __future__ import annotations

import argparse
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

    model = load_model(args.model, device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                       model_type=getattr(args, "model_type", None), config=getattr(args, "model_config", None))
    apply_erasures(model, getattr(args, "erasure", None) or [], force=getattr(args, "force", False))
    return model


def _judge(args, concept: str | None, protocol: str | None = None):
    """The judge of --judge and its settings, checked (folder, weights format, label) before any model is loaded."""
    from erasekit.eval.judges import make_judge
    from erasekit.models.toy import is_toy_folder

    spec = args.judge
    if spec is None and (args.model == "toy" or is_toy_folder(Path(args.model).expanduser())):
        spec = "toy"
    return make_judge(spec, concept=concept, kind=args.kind, label=args.judge_label, top_k=args.judge_top_k,
                      threshold=args.judge_threshold, alternatives=args.judge_alternatives, protocol=protocol,
                      device=args.device)


# ------------------------------------------------------------------ commands
def finite_float(text: str) -> float:
    """An argparse type: a finite number (nan, inf and -1e309 are refused)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def whole_number(low: int, high: int, what: str):
    """An argparse type: a whole number from ``low`` to ``high`` (``what`` names it in the message)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; use {what}, a whole number from {low:,} to {high:,}")
        return value

    return parse


count = whole_number(1, 10**7, "a count")  # steps, batch sizes, samples, columns
seed_value = whole_number(0, 2**31 - 1, "a seed")


def cmd_erase(args) -> None:
    import torch

    from erasekit.methods import build_config
    from erasekit.resolve import erase

    from erasekit.erasure import Erasure
    from erasekit.utils import check_writable

    sets = _parse_sets(args.set)
    config = build_config(args.method, args.preset, sets)  # fail on bad --set before loading
    out = Erasure.file_path(args.out)  # what will be written, suffix included
    if out.exists() and not args.overwrite:
        raise ErasekitError(f"{out} already exists; pass --overwrite or choose another --out")
    check_writable(out)  # before any training, not after it
    if getattr(config, "checkpoint_dir", None):
        args.interrupted = f"its checkpoints are in {config.checkpoint_dir}: rerun with --set resume=true to continue"
    else:
        args.interrupted = "nothing was saved; for a long run pass --set checkpoint_dir=FOLDER (ESD, Receler, CPE) to resume later"
    from erasekit import distributed
    from erasekit.methods import is_data_parallel

    args.device = distributed.process_device(args.device)  # under accelerate launch / torchrun: this process's GPU
    if distributed.is_distributed() and not distributed.is_main() and not is_data_parallel(args.method):
        distributed.start(args.device)
        distributed.barrier()  # process 0 runs the method alone and saves (erasekit.methods.run_method)
        return
    torch.manual_seed(args.seed)
    model = _load(args)
    start = time.perf_counter()
    erasure = erase(model, args.method, args.concept, preserve=args.preserve or [], kind=args.kind, guide=args.guide,
                    preset=args.preset, overrides=sets)  # (the preset's layer for the concepts' kind, if it has one)
    if erasure is None or not distributed.is_main():  # several processes: process 0 saves
        return
    erasure.info.setdefault("seconds", round(time.perf_counter() - start, 2))
    erasure.info.setdefault("seed", args.seed)
    path = erasure.save(out)
    print(f"{erasure}\nsaved to {path}")


def cmd_generate(args) -> None:
    from erasekit.eval.generate import generate_to_folder, process_device, read_prompts

    from erasekit.utils import check_writable

    prompts = read_prompts(args.prompts, args.prompt, seed=args.seed, samples_per_prompt=args.samples_per_prompt, guidance=args.guidance)
    check_writable(args.out, folder=True, room=len(prompts) * 4096)  # (a toy image is ~1 KiB; a 512-pixel one ~400 KiB)
    args.device = process_device(args.device)  # under accelerate launch: this process's GPU
    model = _load(args)
    written = generate_to_folder(model, prompts, args.out, batch_size=args.batch_size, steps=args.steps,
                                 overwrite=args.overwrite)
    print(f"{written} new images in {args.out} ({len(prompts)} requested)")


def cmd_toy_eval(args) -> None:
    from erasekit.toy.evaluate import evaluate_toy, resolve_prompts, summary_lines
    from erasekit.utils import check_writable, write_json

    prompts = resolve_prompts(args.prompts)
    if args.json:
        check_writable(args.json)
    model = _load(args)
    result = evaluate_toy(model, prompts, samples_per_prompt=args.samples_per_prompt, seed=args.seed, guidance=args.guidance, steps=args.steps)
    print("\n".join(summary_lines(result)))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


def cmd_toy_grid(args) -> None:
    from erasekit.toy import world
    from erasekit.toy.evaluate import toy_grid

    from erasekit.utils import check_writable

    prompts = args.prompt or [world.canonical_prompt(s, c, st) for s, c, st in zip(world.SHAPES, world.COLOR_NAMES, world.STYLES * 2)]
    check_writable(args.out)
    model = _load(args)
    path = toy_grid(model, prompts, list(range(args.seed, args.seed + args.seeds)), args.out, guidance=args.guidance, steps=args.steps)
    print(f"wrote {path}")


def cmd_toy_train(args) -> None:
    from erasekit.toy.train import ToyTrainConfig, train_toy_model

    config = ToyTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, checkpoint_every=args.checkpoint_every,
                            exclude=args.exclude)
    folder = train_toy_model(args.out, config, resume=args.resume)
    print(f"toy model written to {folder}; load it with erasekit.load_model({str(folder)!r})")


def cmd_toy_train_classifier(args) -> None:
    from erasekit.toy.classifier import accuracy_on_fresh_images, train_classifier

    model = train_classifier(args.out, steps=args.steps, seed=args.seed)
    print(f"classifier written to {args.out}; accuracy on fresh images: {accuracy_on_fresh_images(model)}")


def cmd_evaluate(args) -> None:
    from erasekit.eval.protocols import describe_protocols, get_protocol
    from erasekit.utils import write_json

    if args.list or args.protocol == "list" or (args.protocol is None and not args.judge):
        print("\n".join(describe_protocols()))
        return
    protocol = get_protocol(args.protocol) if args.protocol else None  # None: the protocol --judge follows
    judged = protocol is None or protocol.name in ("imagenette-top1", "classifier-top1", "clip-zero-shot")
    if args.judge and not judged and args.judge.strip().lower() != protocol.name:
        raise ErasekitError(f"--judge {args.judge} does not go with --protocol {protocol.name}, which has its own detector; "
                            "leave --judge out, or use --protocol imagenette-top1, classifier-top1 or clip-zero-shot")
    if args.json:
        from erasekit.utils import check_writable

        check_writable(args.json)
    if not judged and protocol.name == "toy":
        from erasekit.eval.toy import evaluate_toy_protocol, toy_summary_lines

        if not args.concept:
            raise ErasekitError("the toy protocol needs the erased concept(s); pass --concept triangle (repeat for several)")
        model = _load(args)
        result = evaluate_toy_protocol(model, args.concept, progress=True)
        lines = toy_summary_lines(result)
    else:
        name = protocol.name if protocol else f"--judge {args.judge}"
        if not args.images:
            raise ErasekitError(f"protocol {name} scores a folder of images; pass --images DIR (made by erasekit generate)")
        if not args.json:
            raise ErasekitError(f"protocol {name} writes its result as JSON; pass --json OUT.json")
        device = args.device or "cpu"
        if judged:
            from erasekit.eval.judges import evaluate_judge_folder

            if not args.judge:
                needs = "clip:PATH (a local CLIP)" if name == "clip-zero-shot" else "classifier:PATH (a local image classifier, e.g. microsoft/resnet-50)"
                raise ErasekitError(f"protocol {name} judges with a model you pass; add --judge {needs}")
            judge = _judge(args, args.concept[0] if args.concept and len(args.concept) == 1 else None, protocol=args.protocol)
            result = evaluate_judge_folder(args.images, judge, args.concept)
            record = result["protocol"] or {"name": name, "version": "?"}
            lines = [f"{record['name']} v{record['version']}: {result['shown']}/{result['n']} images show their concept "
                     f"({result['rate']:.1%}, 95% CI {result['ci95'][0]:.1%}-{result['ci95'][1]:.1%})"]
            lines += [f"  {c}: {r['shown']}/{r['n']} ({r['rate']:.1%}, 95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%})"
                      for c, r in result["per_concept"].items()]
        elif protocol.name.startswith("nudenet"):
            from erasekit.eval.nudenet import evaluate_nudenet_folder

            result = evaluate_nudenet_folder(args.images, protocol.name)
            lines = [f"{protocol.name} v{protocol.version}: {result['nude_images']}/{result['images']} images nude ({result['nudity_rate']:.1%})"]
        elif protocol.name == "clip-score":
            from erasekit.eval.clip_score import evaluate_clip_folder

            result = evaluate_clip_folder(args.images, args.clip, device=device)
            lines = [f"clip-score v{protocol.version}: {result['clip_score']:.2f} over {result['images']} images ({result['clip_backbone']})"]
        else:
            from erasekit.eval.fid import evaluate_fid_folder

            result = evaluate_fid_folder(args.images, args.reference, args.inception, device=device)
            lines = [f"fid v{protocol.version}: {result['fid']:.2f} ({result['images']} images vs {result['reference']})"]
    print("\n".join(lines))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


def cmd_attack(args) -> None:
    from erasekit.attacks import make_attack, run_attack
    from erasekit.erasure import Erasure
    from erasekit.models.loading import load_model

    budget = {}
    for pair in [pair for group in args.budget or [] for pair in group]:
        if "=" not in pair:
            raise ErasekitError(f"--budget {pair!r} is not key=value; write e.g. --budget steps=100 samples=2")
        key, value = pair.split("=", 1)
        budget[key.strip()] = value.strip()
    attack = make_attack(args.attack, budget, source="--budget")  # fail on a bad name or --budget before loading
    from erasekit.utils import check_writable

    check_writable(args.out, folder=True)
    from erasekit.distributed import is_main, process_device

    args.device = process_device(args.device)  # under accelerate launch / torchrun: this process's GPU, its share of the prompts
    judge = _judge(args, args.concept.strip())  # a bad --judge, or none for this concept, before loading anything
    erasures = [Erasure.load(path) for path in args.erasure]
    model = load_model(args.model, device=args.device, dtype=args.dtype, model_type=args.model_type, config=args.model_config)
    for erasure in erasures:
        erasure.check_base(model, force=args.force)
    result = run_attack(model, erasures, args.concept, attack=attack, out=args.out, prompts=args.prompts, judge=judge, seed=args.seed,
                        force=args.force)
    if not is_main():  # several processes: process 0 reports
        return
    status = "" if result["complete"] else f" (stopped: {result['stopped']}; {result['prompts_done']}/{result['prompts_total']} prompts, rerun to resume)"
    interval = result.get("success_rate_ci95")
    ci = f", 95% CI {interval[0]:.1%}-{interval[1]:.1%}" if interval else ""
    print(f"attack success rate: {result['success_rate']:.1%} of {result['n']} images{ci}{status}")
    print(f"result: {Path(args.out) / 'result.json'}")


def cmd_export(args) -> None:
    from erasekit.erasure import Erasure
    from erasekit.export import check_export, export
    from erasekit.models.loading import load_model

    erasures = [Erasure.load(path) for path in args.erasure or []]
    check_export(erasures, args.format, args.out, rank=args.rank, approximate=args.approximate, overwrite=args.overwrite)
    model = load_model(args.model, device=args.device, dtype=args.dtype, model_type=args.model_type, config=args.model_config)
    result = export(model, erasures, args.out, args.format, rank=args.rank, approximate=args.approximate,
                    overwrite=args.overwrite, force=args.force)
    print("\n".join(result.lines))


def cmd_bench(args) -> None:
    from erasekit.bench import load_bench_config, run_bench
    from erasekit.distributed import is_main
    from erasekit.eval.report import write_report

    if args.report_only:
        if is_main():  # several processes: one writes
            print(f"report: {write_report(args.out).resolve()}")
        return
    config = load_bench_config(args.config, quick=args.quick)
    if args.judge:  # replaces the config's judge
        config.judge = args.judge
        config.validate()
    index = run_bench(config, args.out)  # under torchrun / accelerate launch: each process its share of the cells
    if not is_main():  # several processes: process 0 wrote the report
        return
    print(f"report: {index.resolve()}\n        {(index.parent / 'report.md').resolve()}")


def cmd_demo(args) -> None:
    from erasekit.demo import run_demo

    run_demo(out=args.out, quick=args.quick)


def cmd_methods(args) -> None:
    from erasekit.methods import METHODS, describe_method

    names = [args.name] if args.name else list(METHODS)
    print("\n\n".join(f"== {name} ==\n{describe_method(name)}" for name in names))


def cmd_attacks(args) -> None:
    from erasekit.attacks import ATTACKS, describe_attack

    names = [args.name] if args.name else list(ATTACKS)
    print("\n\n".join(f"== {name} ==\n{describe_attack(name)}" for name in names))


def _config_help(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``erase --method M --help`` / ``attack --attack A --help``: put M's (A's) config listing after argparse's help."""
    if not argv or argv[0] not in ("erase", "attack") or not {"-h", "--help"} & set(argv[1:]):
        return
    option = "--method" if argv[0] == "erase" else "--attack"
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument(option, dest="name")
    name = peek.parse_known_args(argv[1:])[0].name
    if not name:
        return
    try:
        if argv[0] == "erase":
            from erasekit.methods import describe_method as describe_config
        else:
            from erasekit.attacks import describe_attack as describe_config
        text = describe_config(name)
    except ErasekitError as error:
        text = str(error)
    parser.commands[argv[0]].epilog = text


# -------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the problem, then where the help is), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"erasekit: error: {self.prog}: {message}; see {self.prog} --help\n")


def _model_arguments(p, erasures: bool = True) -> None:
    p.add_argument("--model", default="toy", help="'toy' (default), a diffusers folder, a single-file .safetensors "
                   "checkpoint (SD 1.x, 2.x, SDXL) or a hub id")
    p.add_argument("--model-type", default=None, help="single-file checkpoints: sd1, sd2 (768 px v-prediction), sd2-base or "
                   "sdxl (default: told from the keys; SD 2.x as sd2)")
    p.add_argument("--model-config", default=None, help="single-file checkpoints: a local diffusers folder of the same model "
                   "to take configs and tokenizers from (default: the bundled configs, tokenizers from the Hugging Face cache)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    p.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    if erasures:
        p.add_argument("--erasure", action="append", help="an erasure .safetensors to apply first (repeat to stack)")
        p.add_argument("--force", action="store_true", help="apply erasures even if they were made for another base model")


JUDGE_HELP = ("who decides whether an image shows the concept: toy, nudenet, nudenet-0.45, classifier:PATH (a local transformers "
              "image classifier, e.g. microsoft/resnet-50) or clip:PATH (a local CLIP); default: the toy classifier on the toy "
              "model, NudeNet for nudity")


def _judge_arguments(p) -> None:
    p.add_argument("--judge", default=None, help=JUDGE_HELP)
    p.add_argument("--judge-label", action="append", help="classifier: the class that is the concept, a label or an index "
                   "(repeat for several; default: the concept's name among the classifier's labels)")
    p.add_argument("--judge-top-k", type=count, default=None, help="classifier: success when the concept's class is in the top k "
                   "(default: the protocol's, 1)")
    p.add_argument("--judge-threshold", type=finite_float, default=None, help="clip: success when the concept's probability is at "
                   "least this (default: when it beats every alternative); nudenet: the detection score (default: the protocol's)")
    p.add_argument("--judge-alternatives", default=None, help="clip: the names the concept is compared with, a text file (one a "
                   "line) or a bundled list: imagenette, artists, people, objects (default: the list of its kind)")
    p.add_argument("--kind", default=None, help="clip: what the concept is (object, artist or person), which picks its "
                   "alternatives; default: told from the bundled lists")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="erasekit", description="Erase concepts from text-to-image diffusion models, evaluate and attack the result.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("erase", help="erase concepts with one method and save the erasure file",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="erasekit erase --method NAME --help (or erasekit methods NAME) lists the method's config keys and presets")
    _model_arguments(p, erasures=False)
    p.add_argument("--method", required=True, help="esd, uce, rece, receler, cpe or adv (adversarial hardening)")
    p.add_argument("--concept", action="append", required=True, help="a concept to erase (repeat for several)")
    p.add_argument("--preserve", action="append", help="a concept to keep intact (repeat for several)")
    p.add_argument("--kind", default=None, help="what the concepts are: object, artist, person or nudity (on the toy "
                   "model: shape, color, style); needed where the model's resolver cannot tell")
    p.add_argument("--guide", default=None, help="the prompt an erased concept maps to, instead of its kind's "
                   "(UCE and RECE; e.g. 'art' for artists)")
    p.add_argument("--out", required=True, help="the erasure file to write (.safetensors)")
    p.add_argument("--preset", default=None, help="a named preset of the method's config (every method has 'paper' and 'toy')")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config field (repeat)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=cmd_erase)

    p = sub.add_parser("generate", help="generate images for prompts, skipping images that already exist")
    _model_arguments(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    p.add_argument("--prompts", help="an I2P-style CSV (prompt; optional evaluation_seed/sd_seed/seed, evaluation_guidance/sd_guidance_scale, case_number), a text file (one prompt a line) or toy:SET (all, shapes, held-out, synonyms)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=seed_value, default=0, help="base seed for prompts without their own")
    p.add_argument("--samples-per-prompt", type=count, default=1)
    p.add_argument("--guidance", type=finite_float, default=None)
    p.add_argument("--steps", type=count, default=None)
    p.add_argument("--batch-size", type=count, default=8)
    p.add_argument("--overwrite", action="store_true", help="make again the images of --out made with other settings")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("attack", help="red-team an erasure: run one attack and report its success rate (resumable)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="erasekit attack --attack NAME --help (or erasekit attacks NAME) lists the attack's budget keys")
    _model_arguments(p, erasures=False)
    p.add_argument("--erasure", action="append", required=True, help="the erasure .safetensors to attack (repeat for stacked erasures)")
    p.add_argument("--force", action="store_true", help="attack erasures made for another base model anyway")
    p.add_argument("--concept", required=True, help="the erased concept the judge looks for (e.g. triangle, nudity)")
    p.add_argument("--attack", required=True, help="paraphrase, soft-prompt, unlearndiff, ring-a-bell, p4d, closed-form or textual-inversion")
    p.add_argument("--out", required=True, help="output folder (result.json, grid.png, prompts/); rerunning resumes")
    p.add_argument("--prompts", default=None, help="a text file (one prompt a line) or a CSV with a prompt column; default on the toy model: the concept's prompts")
    p.add_argument("--budget", action="append", nargs="+", metavar="KEY=VALUE", help="override the attack's budget/config, e.g. --budget steps=100 prompts=4 samples=2 time_s=600")
    p.add_argument("--seed", type=seed_value, default=0)
    _judge_arguments(p)
    p.set_defaults(run=cmd_attack)

    p = sub.add_parser("export", help="write a model with erasures merged: a diffusers folder, a LoRA or a single-file checkpoint")
    _model_arguments(p, erasures=False)
    p.add_argument("--erasure", action="append", help="an erasure .safetensors to export (repeat to stack); none: the model as it is")
    p.add_argument("--force", action="store_true", help="export erasures even if they were made for another base model")
    p.add_argument("--format", required=True, choices=["diffusers", "lora", "single-file"],
                   help="diffusers: a model folder (Receler/CPE erasures beside it, for erasekit.apply); lora: a LoRA file for "
                   "pipe.load_lora_weights; single-file: one checkpoint in the original layout (AUTOMATIC1111, ComfyUI)")
    p.add_argument("--out", required=True, help="the folder (diffusers) or .safetensors file to write")
    p.add_argument("--rank", type=count, default=None, help="lora: keep this many singular values per layer (default: "
                   "each delta's numerical rank, which is exact); the reconstruction error is printed")
    p.add_argument("--approximate", action="store_true", help="lora: leave out bias and norm deltas (ESD), which a LoRA "
                   "cannot hold; how much of the delta that is, is printed")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("bench", help="run methods x concepts x attacks on the toy model or a real one and write a report (resumable)")
    p.add_argument("--config", default=None, help="a benchmark TOML file (default: the bundled erasekit/data/bench_default.toml)")
    p.add_argument("--out", default="report", help="output folder: report.md, index.html, results.json, plots, grids, caches")
    p.add_argument("--quick", action="store_true", help="apply the config's [quick] overrides (a smoke test)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from OUT/results.json without running anything")
    p.add_argument("--judge", default=None, help="replace the config's judge: " + JUDGE_HELP)
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("evaluate", help="score an erasure with a named protocol (erasekit evaluate --list shows them)")
    _model_arguments(p)
    p.add_argument("--protocol", default=None, help="toy, nudenet, nudenet-0.45, clip-score, fid, imagenette-top1, "
                   "classifier-top1, clip-zero-shot, or list (default with --judge: the judge's)")
    p.add_argument("--list", action="store_true", help="print the protocols and their settings")
    p.add_argument("--concept", action="append", help="toy: the erased concept (repeat for several); judged protocols: the "
                   "concept every image is judged as (several: each image as the one its prompt names)")
    p.add_argument("--images", default=None, help="nudenet/clip-score/fid: a folder written by erasekit generate")
    p.add_argument("--reference", default=None, help="fid: a folder of reference images or an .npz with mu and sigma")
    p.add_argument("--clip", default=None, help="clip-score: a local CLIP folder (safetensors), e.g. openai/clip-vit-large-patch14")
    p.add_argument("--inception", default=None, help="fid: the FID Inception weights as .safetensors (see erasekit.eval.fid)")
    p.add_argument("--json", default=None, help="write the full result (with the protocol's settings) as JSON here")
    _judge_arguments(p)
    p.set_defaults(run=cmd_evaluate)

    p = sub.add_parser("demo", help="the guided tour on the bundled toy model")
    p.add_argument("--out", default="demo-output", help="where the demo writes its files")
    p.add_argument("--quick", action="store_true", help="fewer images, for a smoke test")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("methods", help="list the erasure methods' config keys (type, default, help) and presets")
    p.add_argument("name", nargs="?", default=None, help="one method (default: all)")
    p.set_defaults(run=cmd_methods)

    p = sub.add_parser("attacks", help="list the attacks' budget keys (type, default, help)")
    p.add_argument("name", nargs="?", default=None, help="one attack (default: all)")
    p.set_defaults(run=cmd_attacks)

    toy = sub.add_parser("toy", help="the toy world: train, evaluate and look at the toy model").add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)
    p = toy.add_parser("eval", help="generate over a prompt set and score each attribute with the toy classifier")
    _model_arguments(p)
    p.add_argument("--prompts", default=None, help="all (default: every shape x color x style), shapes, held-out, synonyms, or a CSV prompt,shape,color,style")
    p.add_argument("--samples-per-prompt", type=count, default=2)
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--guidance", type=finite_float, default=None)
    p.add_argument("--steps", type=count, default=None)
    p.add_argument("--json", default=None, help="write the full result as JSON here")
    p.set_defaults(run=cmd_toy_eval)

    p = toy.add_parser("grid", help="write a PNG grid of prompts by seeds")
    _model_arguments(p)
    p.add_argument("--prompt", action="append", help="a prompt (repeat); default: one per shape")
    p.add_argument("--seeds", type=count, default=6, help="columns")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--guidance", type=finite_float, default=None)
    p.add_argument("--steps", type=count, default=None)
    p.add_argument("--out", default="toy-grid.png")
    p.set_defaults(run=cmd_toy_grid)

    p = toy.add_parser("train", help="train the toy text-to-image model (resumable)")
    p.add_argument("--out", required=True, help="run folder (checkpoint/ and model/ are written inside)")
    p.add_argument("--steps", type=count, default=1800)
    p.add_argument("--batch-size", type=count, default=64)
    p.add_argument("--checkpoint-every", type=count, default=200)
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument(
        "--exclude", default="", metavar="CONCEPTS",
        help="comma-separated toy concepts left out of the data (e.g. triangle): the retrained-without reference")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (refused if it holds other settings)")
    p.set_defaults(run=cmd_toy_train)

    p = toy.add_parser("train-classifier", help="train the toy classifier")
    p.add_argument("--out", default="toy-classifier.safetensors")
    p.add_argument("--steps", type=count, default=1500)
    p.add_argument("--seed", type=seed_value, default=0)
    p.set_defaults(run=cmd_toy_train_classifier)
    parser.commands = sub.choices  # name -> subparser (for _config_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    _config_help(parser, argv)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except ErasekitError as error:
        print(f"erasekit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"erasekit: interrupted; {getattr(args, 'interrupted', 'finished work is kept and a rerun resumes')}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
