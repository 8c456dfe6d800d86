"""ESD cost on an SD-1.4-shaped UNet with random weights: seconds per iteration and peak memory.

The UNet is built from SD 1.4's real config (block_out_channels 320/640/1280/1280,
cross_attention_dim 768, attention_head_dim 8, layers_per_block 2); the text encoder is
bypassed with random 77x768 conditioning, so no weights are downloaded.

One ESD iteration is k DDIM sampling steps (classifier-free guidance: a batch-2 UNet call
each) plus one update (the frozen model's two predictions in one batch-2 call, the trained
prediction with its backward pass, and Adam). k is uniform in 0..N-1, so the expected
cost is ``update + (N-1)/2 * sampling step``; both parts are timed separately (a measured
full iteration would mostly measure the random k).

Each parameter set runs in a fresh subprocess so that its peak memory is its own
(CPU: peak resident set size of the process; CUDA: ``torch.cuda.max_memory_allocated``).

    python benchmarks/bench_esd.py                       # CPU: 64 px (8x8 latents); CUDA: 512 px
    python benchmarks/bench_esd.py --resolution 128 --sets xattn
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from sd14 import sd14_shaped_model


def _available_memory_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_one(parameter_set: str, resolution: int, device: str, repeats: int, ddim_steps: int, precision: str | None,
            gradient_checkpointing: bool) -> dict:
    from erasekit.methods.esd import ESDConfig, ESDTrainer, select_parameters

    started = time.time()
    model = sd14_shaped_model(device)
    unet = model.unet
    build_s = time.time() - started
    n_params = sum(p.numel() for p in unet.parameters())
    n_trained = sum(p.numel() for n, p in unet.named_parameters() if n in set(select_parameters(unet, parameter_set)))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _peak_rss_gib()

    config = ESDConfig(parameter_set=parameter_set, resolution=resolution, ddim_steps=ddim_steps,
                       mixed_precision=precision, gradient_checkpointing=gradient_checkpointing)
    trainer = ESDTrainer(model, ["an image of a church"], config)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    try:
        x = torch.randn(model.latent_shape(1, resolution), generator=torch.Generator().manual_seed(1)).to(device)
        t = torch.tensor([500])
        trainer.train_step(x, t, 0)  # warm-up; allocates Adam's state
        sync()
        started, cpu_started = time.time(), time.process_time()
        for _ in range(repeats):
            trainer.train_step(x, t, 0)
        sync()
        update_s = (time.time() - started) / repeats
        update_cpu_s = (time.process_time() - cpu_started) / repeats

        cond, uncond = trainer.cond[0], trainer.uncond
        with torch.no_grad(), trainer.autocast():
            model.guided_noise(x, t, cond, uncond, 3.0)  # warm-up
            sync()
            started, cpu_started = time.time(), time.process_time()
            for _ in range(repeats):
                model.guided_noise(x, t, cond, uncond, 3.0)
            sync()
        sampling_step_s = (time.time() - started) / repeats
        sampling_step_cpu_s = (time.process_time() - cpu_started) / repeats
    finally:
        trainer.close()
    result = {
        "parameter_set": parameter_set, "device": device, "resolution_px": resolution,
        "latent": list(model.latent_shape(1, resolution)[2:]), "precision": precision or "fp32",
        "gradient_checkpointing": gradient_checkpointing, "unet_parameters": n_params, "trained_parameters": n_trained,
        "build_s": round(build_s, 1), "update_s": round(update_s, 3), "sampling_step_s": round(sampling_step_s, 3),
        "expected_s_per_iteration": round(update_s + (ddim_steps - 1) / 2 * sampling_step_s, 2), "ddim_steps": ddim_steps,
        # CPU time of this process: what the wall times would be on an otherwise idle core (CPU runs only)
        "update_cpu_s": round(update_cpu_s, 3), "sampling_step_cpu_s": round(sampling_step_cpu_s, 3),
        "expected_cpu_s_per_iteration": round(update_cpu_s + (ddim_steps - 1) / 2 * sampling_step_cpu_s, 2),
    }
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        result["peak_memory_gib"] = round(_peak_rss_gib(), 2)
        result["memory_before_training_gib"] = round(rss_before, 2)
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (latent = px/8); default 64 on CPU, 512 on CUDA")
    parser.add_argument("--sets", nargs="+", default=["xattn", "noxattn"], help="parameter sets (ESD-x = xattn, ESD-u = noxattn)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--precision", choices=["bf16", "fp16"], default=None, help="CUDA autocast (ESD's mixed_precision)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    resolution = args.resolution or (512 if args.device == "cuda" else 64)

    if args.child:
        result = run_one(args.child, resolution, args.device, args.repeats, args.ddim_steps, args.precision, args.gradient_checkpointing)
        print("RESULT " + json.dumps(result), flush=True)
        return

    print(f"ESD on an SD-1.4-shaped UNet (random weights), {args.device}, {resolution} px, torch threads {torch.get_num_threads()}")
    for parameter_set in args.sets:
        if args.device == "cpu":
            # fp32: original + trained copy + gradient + 2 Adam moments of the trained subset, plus the rest of the UNet
            need = 3.44 + 4 * 3.3 * (1.0 if parameter_set in ("noxattn", "full") else 0.05) + 0.8
            if _available_memory_gib() < need + 1.5:
                print(f"{parameter_set}: skipped, needs about {need:.0f} GiB and {_available_memory_gib():.1f} GiB is available")
                continue
        command = [sys.executable, __file__, "--child", parameter_set, "--device", args.device, "--resolution", str(resolution),
                   "--repeats", str(args.repeats), "--ddim-steps", str(args.ddim_steps)]
        if args.precision:
            command += ["--precision", args.precision]
        if args.gradient_checkpointing:
            command += ["--gradient-checkpointing"]
        out = subprocess.run(command, capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(f"{parameter_set}: failed (exit {out.returncode})\n{out.stderr[-2000:]}")
            continue
        r = json.loads(lines[-1][len("RESULT "):])
        print(
            f"{parameter_set:>8} ({'ESD-x' if parameter_set == 'xattn' else 'ESD-u' if parameter_set == 'noxattn' else parameter_set}): "
            f"{r['trained_parameters'] / 1e6:.1f}M of {r['unet_parameters'] / 1e6:.0f}M trained | update {r['update_s']:.2f} s | "
            f"sampling step {r['sampling_step_s']:.2f} s | expected {r['expected_s_per_iteration']:.1f} s/iteration "
            f"({r['ddim_steps']}-step DDIM; CPU time {r['expected_cpu_s_per_iteration']:.1f} s) | peak memory {r['peak_memory_gib']:.2f} GiB"
            + (f" (UNet alone {r['memory_before_training_gib']:.2f} GiB)" if "memory_before_training_gib" in r else "")
        )
        print("  " + json.dumps(r))


if __name__ == "__main__":
    main()
