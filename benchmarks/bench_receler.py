"""Receler cost: seconds per outer iteration, with and without adversarial steps.

Two models, both with random weights (nothing is downloaded):

* the toy-shaped UNet (24x24 pixels, MiniLM text encoder), loaded like the real toy model;
* an SD-1.4-shaped UNet built from SD 1.4's config (block_out_channels 320/640/1280/1280,
  cross_attention_dim 768, attention_head_dim 8, layers_per_block 2), its text encoder
  replaced by random 77x768 states.

One outer iteration is: k DDIM sampling steps with classifier-free guidance (one batch-2B
UNet call each, erasers on), the frozen teacher (one batch-2B call that also captures the
attention maps), T_adv attack steps (forward + backward to the adversarial vectors) and one
eraser step (forward + backward to the erasers, Adam). k is random (with the released
code's coupling, min(N, N + 1 - t_enc) for t_enc uniform in 0..N-1; with the toy preset's
"aligned" coupling, t_enc itself), so the parts are timed separately and combined with the expected k:

    seconds per iteration = E[k] * sampling step + teacher + T_adv * attack step + eraser step

Wall times on a shared core overstate the cost; the CPU time of this process is printed
too (what the wall time would be on an idle core). For the toy model a few real
iterations of the toy preset are timed as well. How well the toy preset erases, and how often
attacks bring the concept back compared with ESD-x: ``benchmarks/bench_robustness.py``.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_receler.py            # CPU: SD at 64 px (8x8 latents)
    python benchmarks/bench_receler.py --models sd14 --resolution 128 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from sd14 import sd14_shaped_model


def expected_sampling_steps(ddim_steps: int, coupling: str = "official") -> float:
    from erasekit.methods.receler import coupled_timesteps

    return sum(coupled_timesteps(k, ddim_steps, 1000, coupling)[0] for k in range(ddim_steps)) / ddim_steps


def toy_shaped_model(device: str):
    from diffusers import UNet2DConditionModel

    import erasekit
    from erasekit.models.toy import toy_unet_config, write_toy_folder

    folder = Path(tempfile.mkdtemp(prefix="bench_receler_toy_"))
    torch.manual_seed(0)
    write_toy_folder(folder, UNet2DConditionModel(**toy_unet_config()))
    return erasekit.load_model(folder, device=device)


def timed(function, repeats: int, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) per call, after one warm-up call."""
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.time(), time.process_time()
    for _ in range(repeats):
        function()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.time() - wall) / repeats, (time.process_time() - cpu) / repeats


def bench(model, concept: str, config, repeats: int, device: str) -> dict:
    from erasekit.methods.receler import RecelerTrainer

    trainer = RecelerTrainer(model, [concept], config)
    try:
        batch = config.batch_size
        x = torch.randn(trainer.latent_shape, generator=torch.Generator().manual_seed(1)).to(device, model.dtype)
        t = torch.full((batch,), 500, device=device)
        cond, uncond = trainer.cond[0].repeat(batch), trainer.uncond.repeat(batch)
        eps_c, eps_0, masks = trainer.teacher(x, t, 0)

        def sampling_step():
            with torch.no_grad():
                model.guided_noise(x, t[0], cond, uncond, config.start_guidance)

        parts = {
            "sampling_step": timed(sampling_step, repeats, device),
            "teacher": timed(lambda: trainer.teacher(x, t, 0), repeats, device),
            "attack_step": timed(lambda: trainer.attack_step(x, t, 0, eps_c), repeats, device),
            "eraser_step": timed(lambda: trainer.eraser_step(x, t, 0, eps_c, eps_0, masks), repeats, device),
        }
        eraser_parameters = sum(p.numel() for p in trainer.parameters)
        mask_layers = trainer.mask_layers
    finally:
        trainer.close()
    return {"parts": parts, "eraser_parameters": eraser_parameters, "mask_layers": mask_layers}


def per_iteration(parts: dict, ddim_steps: int, adversarial_steps: int, which: int, coupling: str = "official") -> float:
    """Expected seconds per outer iteration from the parts; ``which`` 0 = wall, 1 = CPU."""
    return (expected_sampling_steps(ddim_steps, coupling) * parts["sampling_step"][which] + parts["teacher"][which]
            + adversarial_steps * parts["attack_step"][which] + parts["eraser_step"][which])


def report(name: str, result: dict, ddim_steps: int, adversarial_steps: list[int], coupling: str = "official") -> None:
    parts = result["parts"]
    print(f"{name}: {result['eraser_parameters']:,} eraser values; mask layers {', '.join(result['mask_layers'])}")
    print("  parts (wall / CPU s): " + " | ".join(f"{k} {w:.3f} / {c:.3f}" for k, (w, c) in parts.items()))
    for steps in adversarial_steps:
        print(f"  {ddim_steps}-step DDIM, {coupling} coupling (E[k] = {expected_sampling_steps(ddim_steps, coupling):.2f}), "
              f"{steps:>2} attack steps: {per_iteration(parts, ddim_steps, steps, 0, coupling):.2f} s/iteration wall, "
              f"{per_iteration(parts, ddim_steps, steps, 1, coupling):.2f} s CPU")


def main(argv=None) -> None:
    from erasekit.methods.receler import PRESETS, RecelerConfig, RecelerTrainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["toy", "sd14"], choices=["toy", "sd14"])
    parser.add_argument("--resolution", type=int, default=None, help="SD pixels (latent = px/8); default 64 on CPU, 512 on CUDA")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--toy-iterations", type=int, default=4, help="real toy-preset iterations to time")
    args = parser.parse_args(argv)
    print(f"Receler, {args.device}, torch threads {torch.get_num_threads()}")

    if "toy" in args.models:
        model = toy_shaped_model(args.device)
        toy = RecelerConfig(**PRESETS["toy"])
        result = bench(model, "triangle", toy, max(args.repeats, 3), args.device)
        report(f"toy-shaped UNet, toy preset (batch {toy.batch_size}, rank {toy.eraser_rank})", result, toy.ddim_steps,
               [0, toy.adversarial_steps, 50], toy.timestep_coupling)
        paper = RecelerConfig()
        result = bench(model, "triangle", paper, max(args.repeats, 3), args.device)
        report("toy-shaped UNet, paper settings (batch 1, rank 128)", result, paper.ddim_steps, [0, 50])
        if args.toy_iterations:
            trainer = RecelerTrainer(model, ["triangle"], RecelerConfig(**{**PRESETS["toy"], "iterations": args.toy_iterations}))
            try:
                wall, cpu = time.time(), time.process_time()
                trainer.train(progress=False)
                print(f"  toy preset, {args.toy_iterations} real iterations: {(time.time() - wall) / args.toy_iterations:.2f} s/iteration "
                      f"wall, {(time.process_time() - cpu) / args.toy_iterations:.2f} s CPU")
            finally:
                trainer.close()

    if "sd14" in args.models:
        resolution = args.resolution or (512 if args.device == "cuda" else 64)
        started = time.time()
        model = sd14_shaped_model(args.device)
        print(f"SD-1.4-shaped UNet built in {time.time() - started:.0f} s "
              f"({sum(p.numel() for p in model.unet.parameters()) / 1e6:.0f}M parameters), {resolution} px")
        paper = RecelerConfig(resolution=resolution)
        result = bench(model, "church", paper, args.repeats, args.device)
        report(f"SD-1.4-shaped UNet, paper settings, {resolution} px", result, paper.ddim_steps, [0, 50])
        print("  " + json.dumps({k: [round(w, 3), round(c, 3)] for k, (w, c) in result["parts"].items()}))


if __name__ == "__main__":
    main()
