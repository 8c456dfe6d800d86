"""Time CPE per concept on the toy model and on an SD 1.4-shaped UNet (random weights, random 77 x 768 text states).

    python benchmarks/bench_cpe.py                  # every section below
    python benchmarks/bench_cpe.py --full           # also train one SD 1.4 concept with the paper's whole schedule
    python benchmarks/bench_cpe.py --three-shapes --per-shape 8   # only the three-shape comparison with UCE

The toy part runs ``erasekit.erase(model, "cpe", ["triangle"], preset="toy")`` on the trained toy
model (a toy-shaped UNet with random weights if none is installed), text encoding included.

The three-shape part (trained toy model only) erases triangle, square and star in one erasure,
with CPE's ``toy`` preset and with UCE's ``toy`` preset, and scores the unerased model and each
erasure with ``evaluate_toy(model, shape_prompts(per_shape=N), samples_per_prompt=2)`` (seed 0:
the same starting noise for every model, so the comparison is paired). It prints each shape's
classifier accuracy, the erased and kept shapes' means and the kept shapes' largest absolute
deviation from the unerased model.

The SD 1.4 part builds the UNet from Stable Diffusion 1.4's config (16 cross-attention layers,
32 to_k/to_v projections) and skips the text encoder: ``cpe.train_concept`` takes text states,
here random (31 templates, 1,000 cached anchors). It times the per-layer weights (σ_max), each kind
of training step, and extrapolates each paper schedule (celebrity: 1,800 + 4 x 450 erase steps and
4 x 450 attack steps); encoding the real prompts with CLIP is not included. Times are the process's
CPU seconds, which stay fair on a core shared with other jobs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

import erasekit
from erasekit.methods import cpe
from sd14 import DIM, TOKENS, sd14_unet

STEPS = 40  # timed steps of each kind


def toy_model():
    try:
        return erasekit.load_model("toy"), "trained toy model"
    except erasekit.ErasekitError:
        import tempfile

        from diffusers import UNet2DConditionModel

        from erasekit.models.toy import toy_unet_config, write_toy_folder

        folder = tempfile.mkdtemp() + "/toy"
        torch.manual_seed(0)
        write_toy_folder(folder, UNet2DConditionModel(**toy_unet_config()))
        return erasekit.load_model(folder), "toy-shaped UNet, random weights (no trained toy model installed)"


def bench_toy() -> None:
    model, label = toy_model()
    started, cpu = time.perf_counter(), time.process_time()
    erasure = erasekit.erase(model, "cpe", ["triangle"], preset="toy", progress=False)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    info = erasure.info["concepts"]["triangle"]
    print(f"toy ({label}): 'triangle', preset toy: {seconds:.1f} s per concept ({cpu:.1f} CPU s; "
          f"{info['templates']} templates, {info['anchors']} anchor prompts, text encoding included)", flush=True)


def timed_training(bank, targets, neutrals, anchors, config) -> float:
    """CPU seconds of one training run (the process's own time: fair on a core shared with other jobs)."""
    started = time.process_time()
    cpe.train_concept(bank, targets, neutrals, anchors, config, progress=False)
    return time.process_time() - started


def bench_sd14(full: bool) -> None:
    unet = sd14_unet()
    layers = {n: m for n, m in unet.named_modules() if getattr(m, "is_cross_attention", False)}
    started = time.process_time()
    bank = cpe.KVProjections.from_layers(layers, TOKENS)
    seconds = time.process_time() - started
    print(f"SD 1.4 UNet (random): {len(bank.names)} projections; per-layer weights (σ_max) in {seconds:.1f} CPU s", flush=True)
    print("  CPU time per step and per concept:")

    generator = torch.Generator().manual_seed(0)
    targets, neutrals = (torch.randn(31, TOKENS, DIM, generator=generator) for _ in range(2))
    anchors = torch.randn(1000, TOKENS, DIM, generator=generator)
    paper = cpe.CPEConfig()  # celebrity: r 1, r_g 16, 16 perturbations, 32 anchors per step
    plain = timed_training(bank, targets, neutrals, anchors, replace(paper, stages=1, first_stage_iterations=STEPS)) / STEPS
    attack = timed_training(bank, targets, neutrals, anchors, replace(
        paper, stages=2, first_stage_iterations=0, iterations=0, adversarial_iterations=STEPS)) / STEPS
    both = timed_training(bank, targets, neutrals, anchors, replace(
        paper, stages=2, first_stage_iterations=0, iterations=STEPS, adversarial_iterations=STEPS)) / STEPS
    adversarial = both - attack
    print(f"    erase step, stage 0 (1 target + 32 anchors):           {1000 * plain:7.1f} ms")
    print(f"    erase step, stages 1.. (+ 16 adversarial embeddings):  {1000 * adversarial:7.1f} ms")
    print(f"    attack step (16 embeddings):                           {1000 * attack:7.1f} ms")

    inputs = torch.randn(17, TOKENS, DIM, generator=generator)
    x = torch.randn(17, TOKENS, DIM, generator=generator)
    resag = cpe.ResAG(bank.dim, bank.out_dims)
    with torch.no_grad():
        for kind, function in [("input-space form", lambda: bank.losses(resag.mixed(inputs), resag.down, bank.factors(resag), x)),
                               ("projection outputs", lambda: bank.direct_losses(resag, inputs, x))]:
            function()
            started = time.process_time()
            for _ in range(3):
                function()
            print(f"    loss of 17 prompts over 32 projections, {kind:<19} {1000 * (time.process_time() - started) / 3:7.1f} ms")

    for name, preset in [("celebrity", "paper"), ("artist", "artist"), ("explicit", "explicit")]:
        config = erasekit.methods.build_config("cpe", preset)
        later = config.stages - 1
        # steps scale with the number of perturbations; anchor batch and ranks are taken as the celebrity ones
        adversarial_step = plain + (adversarial - plain) * config.adversarial_embeddings / 16
        attack_step = attack * config.adversarial_embeddings / 16
        seconds = (config.first_stage_iterations * plain + later * config.iterations * adversarial_step
                   + later * config.adversarial_iterations * attack_step)
        print(f"    paper {name} schedule, one concept (extrapolated):       {seconds:7.0f} s")
    if full:
        seconds = timed_training(bank, targets, neutrals, anchors, paper)
        print(f"    paper celebrity schedule, one concept (measured):     {seconds:7.0f} s")


THREE_SHAPES = ["triangle", "square", "star"]


def bench_three_shapes(per_shape: int) -> None:
    """Erase THREE_SHAPES at once with CPE and with UCE (toy presets); print per-shape accuracy."""
    from erasekit.toy import world
    from erasekit.toy.classifier import load_classifier
    from erasekit.toy.evaluate import evaluate_toy, shape_prompts

    try:
        model = erasekit.load_model("toy")
        classifier = load_classifier()
    except erasekit.ErasekitError as error:
        print(f"three shapes: skipped, the trained toy model or classifier is not available ({error})")
        return
    prompts = shape_prompts(per_shape=per_shape)

    def shape_accuracy() -> dict[str, float]:
        result = evaluate_toy(model, prompts, samples_per_prompt=2, seed=0, progress=False, classifier=classifier)
        return result["by_value"]["shape"]

    print(f"three shapes: erasing {', '.join(THREE_SHAPES)} in one erasure; {per_shape} prompts per shape, "
          f"2 samples each ({2 * per_shape} images per shape), seed 0", flush=True)
    accuracy = {"unerased": shape_accuracy()}
    for method in ("cpe", "uce"):
        started = time.perf_counter()
        erasure = erasekit.erase(model, method, THREE_SHAPES, preset="toy", progress=False)
        seconds = time.perf_counter() - started
        erasure.apply(model)
        try:
            accuracy[method] = shape_accuracy()
        finally:
            erasure.remove(model)
        print(f"  {method.upper()} erased the three shapes in {seconds:.1f} s", flush=True)

    kept = [shape for shape in world.SHAPES if shape not in THREE_SHAPES]
    columns = list(accuracy)
    print(f"  {'shape':<20}" + "".join(f"{name.upper() if name != 'unerased' else name:>10}" for name in columns))
    for shape in THREE_SHAPES + kept:
        label = f"{shape} ({'erased' if shape in THREE_SHAPES else 'kept'})"
        print(f"  {label:<20}" + "".join(f"{100 * accuracy[name][shape]:9.1f}%" for name in columns))

    def mean(name: str, shapes: list[str]) -> float:
        return sum(accuracy[name][shape] for shape in shapes) / len(shapes)

    print(f"  {'erased mean':<20}" + "".join(f"{100 * mean(name, THREE_SHAPES):9.1f}%" for name in columns))
    print(f"  {'kept mean':<20}" + "".join(f"{100 * mean(name, kept):9.1f}%" for name in columns))
    deviations = {name: max(abs(accuracy[name][s] - accuracy["unerased"][s]) for s in kept) for name in columns}
    print(f"  {'kept max |dev|':<20}" + "".join(f"{100 * deviations[name]:8.1f}pt" for name in columns), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also train one SD 1.4 concept with the paper's schedule")
    parser.add_argument("--three-shapes", action="store_true", help="run only the three-shape comparison with UCE")
    parser.add_argument("--per-shape", type=int, default=8, help="prompts per shape in the three-shape comparison")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)", flush=True)
    if not args.three_shapes:
        bench_toy()
    bench_three_shapes(args.per_shape)
    if not args.three_shapes:
        bench_sd14(args.full)


if __name__ == "__main__":
    main()
