"""Every method on one GPU: seconds per iteration, a full erasure at the ``paper`` preset, peak memory, and generation.

The models are Stable Diffusion 1.4 (512 px) and SDXL (1024 px) built from their real configs with random
weights (``benchmarks/gpu_configs.py``; nothing is downloaded). For each model, in this order:

* ``uce``, ``rece``: one full erasure at the ``paper`` preset, timed (closed form: seconds per solve =
  the run over its solves; UCE is one solve, RECE one plus one per epoch);
* ``cpe``: the text side (templates, anchor selection, encoding) timed once, then optimiser steps of
  each kind (stage-0 erase, later erase, attack) timed on a short window; the full run is
  extrapolated to the preset's step counts;
* ``esd``, ``receler``: the parts of one iteration timed separately (a DDIM sampling step of x_t, the
  update; Receler: the teacher, an adversarial step, the eraser step) and combined with the expected
  number of sampling steps, as ``bench_esd.py`` / ``bench_receler.py`` do; the full run (1,000 / 500
  iterations) is extrapolated. Each also runs with ``mixed_precision=bf16`` and gradient checkpointing;
* ``generate``: images per second of ``erasekit generate`` (``generate_to_folder``, PNGs written) and of
  a raw diffusers pipeline on the same modules (``pipe(...)``, PNGs written), float16, same prompts,
  seeds, steps and batch.

Peak memory is ``torch.cuda.max_memory_allocated`` over the row (the model's weights included).
Rows that would overrun the time budget (``--budget-s``) are skipped and say so; a row that runs out
of memory says ``OOM``. The run prints one table and writes JSON (``--json``).

    python benchmarks/gpu.py                      # one GPU: SD 1.4 and SDXL, under 8 minutes on an H200
    python benchmarks/gpu.py --dry-run --json x   # CPU: tiny configs, every row, seconds (what CI runs)
    python benchmarks/gpu.py --estimate-memory    # CPU: the README's memory estimates (meta tensors, no compute)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here is downloaded
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpu_configs import REAL, TINY, build_pipeline, write_tokenizer_files  # noqa: E402

# what each method erases (the domain of its paper preset)
CONCEPTS = {"esd": ("Van Gogh", "artist"), "receler": ("nudity", "nudity"), "cpe": ("Taylor Swift", "person"),
            "uce": ("Van Gogh", "artist"), "rece": ("nudity", "nudity")}
FAST_SWITCHES = {"mixed_precision": "bf16", "gradient_checkpointing": True}
# generation: prompts, steps and batch per model (real / dry run)
GENERATION = {"sd14": dict(images=8, batch=8, steps=25), "sdxl": dict(images=4, batch=4, steps=25)}
DRY_GENERATION = dict(images=2, batch=2, steps=3)
ROW_RESERVE_S = {"sd14": 25.0, "sdxl": 60.0}  # a row starts only with this much of the budget left


class Bench:
    def __init__(self, device: str, dry_run: bool, budget_s: float, repeats: int):
        self.device, self.dry_run, self.repeats = torch.device(device), dry_run, repeats
        self.cuda = self.device.type == "cuda"
        self.started = time.perf_counter()
        self.deadline = self.started + budget_s
        self.rows: list[dict] = []

    # ------------------------------------------------------------------ clocks and memory
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, function, repeats: int | None = None) -> float:
        """Seconds per call: one warm-up call, then the mean of ``repeats`` calls."""
        function()
        self.sync()
        repeats = repeats or self.repeats
        started = time.perf_counter()
        for _ in range(repeats):
            function()
        self.sync()
        return (time.perf_counter() - started) / repeats

    def reset_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.cuda else None

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    # ------------------------------------------------------------------------------ rows
    def row(self, model_name: str, method: str, setting: str, function) -> dict:
        """Run one row (``function() -> dict`` of figures), unless the budget is spent; OOM and errors are recorded."""
        row = {"model": model_name, "method": method, "setting": setting, "status": "ok"}
        reserve = 0.0 if self.dry_run else ROW_RESERVE_S[model_name]
        if self.time_left() < reserve:
            row["status"] = "skipped (time budget)"
        else:
            self.reset_memory()
            started = time.perf_counter()
            try:
                row.update(function())
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as error:  # noqa: BLE001 -- one row's failure is reported, the others still run
                if self.dry_run:
                    raise
                row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''}"
            row.setdefault("peak_gib", self.peak_gib())
            row["row_seconds"] = round(time.perf_counter() - started, 2)
        self.rows.append(row)
        print(f"  {model_name:5} {method:8} {setting:24} {row['status']}", flush=True)
        return row


# ----------------------------------------------------------------------------------- methods
def closed_form(bench: Bench, model, method: str) -> dict:
    import erasekit

    concept, kind = CONCEPTS[method]
    started = time.perf_counter()
    erasure = erasekit.erase(model, method, [concept], kind=kind, preset="paper", progress=False)
    bench.sync()
    seconds = time.perf_counter() - started
    solves = 1 + int(erasure.config.get("epochs", 0)) if method == "rece" else 1
    return {"rate": seconds / solves, "unit": "s/solve", "solves": solves, "full_s": seconds, "full": "measured"}


def cpe(bench: Bench, model) -> dict:
    from erasekit.methods import build_config
    from erasekit.methods.cpe import CPETrainer
    from erasekit.resolve import resolve_targets

    concept, kind = CONCEPTS["cpe"]
    paper = build_config("cpe", "paper")
    window = 3 if bench.dry_run else 20
    targets = resolve_targets(model, [concept], kind=kind)
    short = build_config("cpe", "paper", {"stages": "2", "first_stage_iterations": str(window + 1),
                                          "iterations": str(window + 1), "adversarial_iterations": str(window + 1)})
    started = time.perf_counter()
    trainer = CPETrainer(model, targets, short)
    trainer._start_concept()  # the text side: templates, anchor selection, encoding
    bench.sync()
    setup = time.perf_counter() - started
    concept_trainer = trainer.current
    times: dict[str, list[float]] = {}
    while not concept_trainer.done:
        phase = "attack" if concept_trainer.phase == "attack" else f"erase{min(concept_trainer.stage, 1)}"
        started = time.perf_counter()
        concept_trainer.step()
        bench.sync()
        times.setdefault(phase, []).append(time.perf_counter() - started)
    per_step = {phase: sum(values[1:]) / len(values[1:]) for phase, values in times.items()}  # the first of each is warm-up
    attacks = paper.stages - 1 if paper.adversarial_embeddings and paper.adversarial_iterations else 0
    counts = {"erase0": paper.first_stage_iterations, "erase1": (paper.stages - 1) * paper.iterations,
              "attack": attacks * paper.adversarial_iterations}
    steps = sum(counts.values())
    training = sum(counts[phase] * per_step[phase] for phase in counts)
    return {"rate": training / steps, "unit": "s/step", "paper_steps": steps, "full_s": setup + training,
            "full": "extrapolated", "setup_s": round(setup, 3), "per_phase_s": per_step}


def esd(bench: Bench, model, overrides: dict) -> dict:
    from erasekit.methods import build_config
    from erasekit.methods.esd import ESDTrainer, coupled_steps, sample_x_t

    concept, _ = CONCEPTS["esd"]
    config = build_config("esd", "paper", {k: str(v) for k, v in overrides.items()})
    trainer = ESDTrainer(model, [concept], config)
    try:
        n, total = config.ddim_steps, trainer.num_train_timesteps
        expected_steps = sum(coupled_steps(k, n, total, config.timestep_coupling)[0] for k in range(n)) / n
        _, _, t, noise = trainer.draw()
        cond, uncond = trainer.cond[0], trainer.uncond
        window = 2

        def sampling():
            with torch.no_grad(), trainer.autocast():
                return sample_x_t(model, cond, uncond, window, noise, ddim_steps=n, guidance=config.start_guidance,
                                  scheduler=trainer.scheduler)

        sampling_step = bench.timed(sampling, repeats=1) / window
        x_t = sampling().to(trainer.dtype)
        update = bench.timed(lambda: trainer.train_step(x_t, t, 0))
    finally:
        trainer.close()
    rate = expected_steps * sampling_step + update
    return {"rate": rate, "unit": "s/it", "paper_iterations": config.iterations, "full_s": rate * config.iterations,
            "full": "extrapolated", "sampling_step_s": sampling_step, "update_s": update, "expected_sampling_steps": expected_steps}


def receler(bench: Bench, model, overrides: dict) -> dict:
    from erasekit.methods import build_config
    from erasekit.methods.receler import RecelerTrainer, coupled_timesteps

    concept, _ = CONCEPTS["receler"]
    config = build_config("receler", "paper", {k: str(v) for k, v in overrides.items()})
    trainer = RecelerTrainer(model, [concept], config)
    try:
        n, total = config.ddim_steps, trainer.num_train_timesteps
        expected_steps = sum(coupled_timesteps(k, n, total, config.timestep_coupling)[0] for k in range(n)) / n
        _, _, t, noise = trainer.draw()
        t = t.to(model.device)
        window = 2
        sampling_step = bench.timed(lambda: trainer.sample_x_t(0, window, noise), repeats=1) / window
        x_t = trainer.sample_x_t(0, window, noise).to(model.dtype)
        teacher_s = bench.timed(lambda: trainer.teacher(x_t, t, 0))
        eps_concept, eps_empty, masks = trainer.teacher(x_t, t, 0)
        attack = bench.timed(lambda: trainer.attack_step(x_t, t, 0, eps_concept))
        eraser = bench.timed(lambda: trainer.eraser_step(x_t, t, 0, eps_concept, eps_empty, masks))
    finally:
        trainer.close()
    rate = expected_steps * sampling_step + teacher_s + config.adversarial_steps * attack + eraser
    return {"rate": rate, "unit": "s/it", "paper_iterations": config.iterations, "full_s": rate * config.iterations,
            "full": "extrapolated", "sampling_step_s": sampling_step, "teacher_s": teacher_s, "attack_step_s": attack,
            "eraser_step_s": eraser, "expected_sampling_steps": expected_steps}


def generation(bench: Bench, model, pipe, settings: dict, folder: Path) -> tuple[dict, dict]:
    """(erasekit row figures, diffusers row figures): images/s of the same work through each."""
    from erasekit.eval.generate import generate_to_folder, read_prompts

    prompts = [f"a painting of a {word} in the style of Van Gogh" for word in ("cat", "house", "tree", "river", "boat", "bridge",
                                                                                   "garden", "church")]
    jobs = read_prompts(prompts=[prompts[i % len(prompts)] for i in range(settings["images"])], seed=0)
    steps, batch = settings["steps"], settings["batch"]
    generate_to_folder(model, jobs[:1], folder / "warm-erasekit", batch_size=1, steps=2, progress=False)
    bench.sync()
    started = time.perf_counter()
    generate_to_folder(model, jobs, folder / "erasekit", batch_size=batch, steps=steps, progress=False)
    bench.sync()
    ours = len(jobs) / (time.perf_counter() - started)
    ours_peak = bench.peak_gib()
    bench.reset_memory()

    def raw(chosen, steps, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(chosen), batch):
            part = chosen[start : start + batch]
            images = pipe(prompt=[j.prompt for j in part], num_inference_steps=steps, guidance_scale=model.default_guidance,
                          generator=[torch.Generator().manual_seed(j.seed) for j in part]).images
            for job, image in zip(part, images):
                image.save(out / job.filename)

    raw(jobs[:1], 2, folder / "warm-diffusers")
    bench.sync()
    started = time.perf_counter()
    raw(jobs, steps, folder / "diffusers")
    bench.sync()
    theirs = len(jobs) / (time.perf_counter() - started)
    common = {"unit": "img/s", "images": len(jobs), "steps": steps, "batch": batch, "dtype": str(model.dtype).replace("torch.", "")}
    return ({**common, "rate": ours, "vs_diffusers": ours / theirs, "peak_gib": ours_peak},
            {**common, "rate": theirs, "peak_gib": bench.peak_gib()})


# ------------------------------------------------------------------------------------ the run
def bench_model(bench: Bench, name: str, tokenizer_folder: Path, work: Path) -> None:
    from erasekit.models.loading import handle_from_pipeline

    configs = TINY[name] if bench.dry_run else REAL[name]
    started = time.perf_counter()
    pipe = build_pipeline(name, configs, str(bench.device), tokenizer_folder)
    pipe.set_progress_bar_config(disable=True)
    model = handle_from_pipeline(pipe, name=f"{name}-random", kind="sd" if name == "sd14" else "sdxl")
    bench.sync()
    print(f"{name}: built in {time.perf_counter() - started:.1f} s "
          f"({sum(p.numel() for p in model.unet.parameters()) / 1e6:,.0f} M UNet values)", flush=True)
    bench.row(name, "uce", "paper", lambda: closed_form(bench, model, "uce"))
    bench.row(name, "rece", "paper", lambda: closed_form(bench, model, "rece"))
    bench.row(name, "cpe", "paper", lambda: cpe(bench, model))
    bench.row(name, "esd", "paper (fp32)", lambda: esd(bench, model, {}))
    bench.row(name, "esd", "paper + bf16 + ckpt", lambda: esd(bench, model, FAST_SWITCHES))
    bench.row(name, "receler", "paper (fp32)", lambda: receler(bench, model, {}))
    bench.row(name, "receler", "paper + bf16 + ckpt", lambda: receler(bench, model, FAST_SWITCHES))
    if bench.cuda:
        model.to(dtype=torch.float16)
    settings = DRY_GENERATION if bench.dry_run else GENERATION[name]
    figures: dict = {}

    def ours():
        figures["ours"], figures["theirs"] = generation(bench, model, pipe, settings, work / name)
        return figures["ours"]

    row = bench.row(name, "generate", "erasekit generate", ours)
    if "theirs" in figures:
        bench.rows.append({"model": name, "method": "generate", "setting": "diffusers pipeline", "status": "ok",
                           **figures["theirs"]})
    elif row["status"] != "ok":
        bench.rows.append({"model": name, "method": "generate", "setting": "diffusers pipeline", "status": row["status"]})
    del model, pipe
    bench.reset_memory()


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def table(rows: list[dict]) -> str:
    header = ["model", "method", "setting", "rate", "full run at paper preset", "peak GiB", "status"]
    lines = []
    for r in rows:
        rate = f"{r['rate']:.4g} {r['unit']}" if "rate" in r else "-"
        if "full_s" in r:
            full = f"{duration(r['full_s'])} ({r['full']})"
        elif r.get("unit") == "img/s":
            full = f"{r['images']} images, {r['steps']} steps, batch {r['batch']}, {r['dtype']}" + (
                f"; {r['vs_diffusers']:.2f}x diffusers" if "vs_diffusers" in r else "")
        else:
            full = "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append([r["model"], r["method"], r["setting"], rate, full, peak, r["status"]])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
    text = ["| " + " | ".join(str(x).ljust(w) for x, w in zip(line, widths)) + " |" for line in [header, *lines]]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(text)


def environment(device: torch.device) -> dict:
    import diffusers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU: every row in seconds (for CI)")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--models", default="sd14,sdxl", help="comma-separated: sd14, sdxl")
    parser.add_argument("--budget-s", type=float, default=380.0, help="no row starts after this many seconds (default 380: "
                        "the whole run ends in under 8 minutes on an H200)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per part, after one warm-up call")
    parser.add_argument("--json", default="gpu-bench.json", help="where to write the results")
    parser.add_argument("--estimate-memory", action="store_true", help="print the memory estimates of the README (meta "
                        "tensors on the CPU: parameter counts and saved activations, nothing computed) and exit")
    args = parser.parse_args(argv)
    if args.estimate_memory:
        from gpu_memory import main as estimate

        return estimate(args.models.split(","), args.json if args.json != "gpu-bench.json" else None)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; run with --dry-run (tiny configs on the CPU)", file=sys.stderr)
        return 2
    bench = Bench(device, args.dry_run, args.budget_s, 1 if args.dry_run else args.repeats)
    work = Path(tempfile.mkdtemp(prefix="erasekit-gpu-bench-"))
    tokenizer_folder = write_tokenizer_files(work / "tokenizer", extra=" ".join(c for c, _ in CONCEPTS.values()))
    print(f"erasekit GPU benchmark on {environment(bench.device).get('gpu', device)}"
          f"{' (dry run: tiny configs)' if args.dry_run else ''}", flush=True)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in REAL:
            parser.error(f"unknown model {name!r}; use sd14, sdxl")
        bench_model(bench, name, tokenizer_folder, work)
    total = time.perf_counter() - bench.started
    print()
    print(table(bench.rows))
    print(f"\ntotal {total:.0f} s; 'extrapolated' full runs are the timed parts times the preset's iteration counts")
    result = {"dry_run": args.dry_run, "environment": environment(bench.device), "total_seconds": round(total, 1),
              "budget_seconds": args.budget_s, "rows": bench.rows}
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
