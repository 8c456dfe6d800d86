"""What every attack shares: config and budget, judges, the erased model, evaluation, resume, results.

An attack is a ``@dataclass`` config (defaults = its paper's) and a small class with

* ``prepare(run)``: once per run (a concept vector, a learned token, ...), and
* ``attack_prompt(run, prompt, index) -> AdversarialPrompt``: the conditioning the erased model
  is prompted with instead of ``prompt`` (plus, when there is one, its text and the tensors to keep).

:func:`run_attack` does the rest, the same way for every attack: for each prompt it calls the
attack, generates ``samples`` images from the adversarial conditioning with the **erased** model
(seeds from (seed, prompt index, sample index), so attacks are compared on the same noise), asks
the judge which images show the concept, and keeps the result in ``OUT/prompts/NNN.json``
(+ ``NNN.safetensors``: the adversarial conditioning, any token embeddings and the images). A
rerun with the same settings skips finished prompts. At the end it writes ``OUT/result.json``
and ``OUT/grid.png`` (one row per prompt). The attacked erasures not on already are applied at the
start and taken off at the end; where an attack needs the unerased model (target images,
trajectories) it uses ``with run.model.erasures_off():``, which takes every applied erasure off.

Success rate = images judged to show the concept / images generated (``n``).

Under ``accelerate launch`` or ``torchrun`` (``erasekit.distributed``) the unfinished prompts are shared
out by rank, each process on its own device; process 0 prepares first (the others then read what it
saved), writes ``run.json``, and at the end merges every process's ``prompts/NNN.json`` into one
``result.json``, the same (timings aside) as one process's with the same seed. Records are per prompt,
so a rerun resumes with any number of processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from erasekit import distributed
from erasekit.config import parse_values
from erasekit.errors import ErasekitError
from erasekit.eval.judges import Judge, judge_record, make_judge
from erasekit.eval.stats import rate_record
from erasekit.models.handle import Conditioning
from erasekit.utils import image_grid, sample_seed, save_png, save_safetensors, write_json, write_text


# ------------------------------------------------------------------------------------ config
@dataclass
class AttackConfig:
    """Settings every attack has; each attack's config adds its own (the paper's defaults).

    ``steps`` is the attack's optimisation budget where it has one (the total optimiser steps, or
    the generations of a genetic search); attacks without optimisation ignore it.
    """

    prompts: int | None = field(default=None, metadata={"help": "Attack at most this many prompts (none: all of them).", "min": 1})
    samples: int = field(default=1, metadata={"help": "Images generated and judged per adversarial prompt.", "min": 1})
    time_s: float | None = field(default=None, metadata={
        "help": "Wall-clock budget in seconds: loops stop and no new prompt starts after it (none: no limit).", "min": 0})
    guidance: float | None = field(default=None, metadata={
        "help": "Classifier-free guidance of the judged images (none: the model's default).", "min": 0})
    inference_steps: int | None = field(default=None, metadata={
        "help": "Sampling steps of the judged images (none: the model's default).", "min": 1})


def build_attack_config(config_class, budget: dict | None = None, defaults: dict | None = None, source: str = "budget",
                        name: str | None = None):
    """``config_class`` with ``defaults`` then ``budget`` applied; strings (from the CLI) are typed by the field.

    ``steps`` is accepted by every attack (ignored by attacks that do not optimise).
    """
    fields = {f.name for f in dataclasses.fields(config_class)}
    values = dict(defaults or {})
    budget = {str(key).strip(): value for key, value in (budget or {}).items()}
    if "steps" in budget and getattr(config_class, "steps_field", None):
        budget[config_class.steps_field] = budget.pop("steps")  # e.g. Ring-A-Bell's generations
    elif "steps" in budget and "steps" not in fields:
        budget.pop("steps")
    values.update(parse_values(config_class, budget, source=source, name=name))
    return config_class(**values)


# ------------------------------------------------------------------------------------ judges
# The judges live in erasekit.eval.judges (toy, nudenet, classifier:PATH, clip:PATH); re-exported here.
def default_judge(model, concept: str) -> Judge:
    """The toy classifier on the toy model, NudeNet for nudity; otherwise a one-line error naming --judge."""
    return make_judge(None, model=model, concept=concept)


# ------------------------------------------------------------------------------------ prompts
def read_prompt_file(path) -> list[str]:
    """Prompts from a text file (one a line) or a CSV with a ``prompt`` column."""
    from erasekit.eval.generate import read_prompts

    seen, prompts = set(), []
    for job in read_prompts(str(path)):
        if job.case not in seen:
            seen.add(job.case)
            prompts.append(job.prompt)
    return prompts


def default_prompts(model, concept: str, held_out: bool = False) -> list[str]:
    """For the toy model: 8 canonical prompts of the concept (``held_out``: its 8 held-out paraphrases)."""
    if model.kind != "toy":
        raise ErasekitError(f"no default prompts for {concept!r} on this model; pass prompts= (a list, or a file with one prompt a line)")
    from erasekit.toy import world
    from erasekit.toy.evaluate import held_out_prompts, shape_prompts

    attribute, value = world.parse_concept(concept)
    if attribute == "shape":
        chosen = held_out_prompts([value], per_word=4) if held_out else shape_prompts([value], per_shape=8)
        return [p.prompt for p in chosen]
    prompts = []
    for index, shape in enumerate(world.SHAPES):
        color = value if attribute == "color" else world.COLOR_NAMES[index]
        style = value if attribute == "style" else world.STYLES[index % 4]
        prompts.append(world.held_out_prompt(shape, color, style, index) if held_out else world.canonical_prompt(shape, color, style))
    return prompts


# ------------------------------------------------------------------------------------ one attacked prompt
@dataclass
class AdversarialPrompt:
    """What an attack found for one prompt: the conditioning to prompt the erased model with."""

    conditioning: Conditioning  # one row
    text: str | None = None  # the adversarial prompt as text, for discrete attacks
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # kept with the result (token embeddings, ids)
    info: dict = field(default_factory=dict)  # loss, steps run, early stop, ...


def add_noise(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε from the model's training schedule (t: one timestep per row)."""
    alphas = model.scheduler.alphas_cumprod.to(x0.device, torch.float32)[t.to(x0.device).long()].view(-1, 1, 1, 1)
    return (alphas.sqrt() * x0 + (1 - alphas).sqrt() * noise).to(x0.dtype)


def denoising_target(model, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts at x_t: ε, or v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0 for v-prediction models (SD 2.x 768)."""
    if model.scheduler.config.get("prediction_type", "epsilon") != "v_prediction":
        return noise
    alphas = model.scheduler.alphas_cumprod.to(x0.device, torch.float32)[t.to(x0.device).long()].view(-1, 1, 1, 1)
    return (alphas.sqrt() * noise - (1 - alphas).sqrt() * x0).to(x0.dtype)


@torch.no_grad()
def generate_from_conditioning(model, cond: Conditioning, seeds: list[int], guidance=None, steps=None, uncond=None,
                               return_latents: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] from one conditioning row, one seed each (same noise as ``model.generate``)."""
    scheduler = model.make_scheduler()
    scheduler.set_timesteps(steps or model.default_steps, device=model.device)
    latents = torch.cat([model.initial_latents(1, torch.Generator().manual_seed(int(s)), scheduler=scheduler) for s in seeds])
    cond = cond.detach()
    if len(cond) == 1 and len(seeds) > 1:
        cond = cond.repeat(len(seeds))
    uncond = uncond if uncond is not None else model.encode([""])
    out = model.sample(cond, uncond=uncond.repeat(len(seeds)) if len(uncond) == 1 else uncond, guidance=guidance,
                       num_inference_steps=steps, latents=latents)
    return out if return_latents else model.decode(out)


class AttackRun:
    """The context an attack works in: the erased model, the attacked erasures, the judge, the clock, the output folder.

    The attacked erasures are on throughout; ``with run.model.erasures_off():`` gives the unerased model.
    """

    def __init__(self, model, erasures: list, concept: str, judge: Judge, config, seed: int, out: Path | None,
                 prompts: list[str], progress: bool):
        self.model = model
        self.erasures = list(erasures)
        self.concept = concept
        self.judge = judge
        self.config = config
        self.seed = seed
        self.out = out
        self.prompts = prompts
        self.progress = progress
        self.started = time.perf_counter()
        self._uncond = None

    def out_of_time(self) -> bool:
        return self.config.time_s is not None and time.perf_counter() - self.started > self.config.time_s

    def uncond(self) -> Conditioning:
        if self._uncond is None:
            self._uncond = self.model.encode([""])
        return self._uncond

    def generate(self, cond: Conditioning, seeds: list[int], return_latents: bool = False) -> torch.Tensor:
        """Images from ``cond`` with whatever erasures are on now."""
        return generate_from_conditioning(self.model, cond, seeds, self.config.guidance, self.config.inference_steps,
                                          self.uncond(), return_latents)

    def check(self, cond: Conditioning, prompt_index: int) -> bool:
        """Early-stopping check of the optimising attacks: does the erased model draw the concept (first seed)?"""
        images = self.generate(cond, [sample_seed(self.seed, prompt_index, 0)])
        return bool(self.judge(images, self.concept)[0])

    def generator(self, prompt_index: int) -> torch.Generator:
        """A generator seeded by (seed, prompt index): a prompt's attack does not depend on the ones before it."""
        return torch.Generator().manual_seed(sample_seed(self.seed, prompt_index, 10_007))

    def artifact_path(self, name: str) -> Path | None:
        return None if self.out is None else self.out / name


class Attack:
    """Base class: subclasses set ``name`` and ``config_class`` and implement ``attack_prompt``."""

    name = "attack"
    config_class = AttackConfig
    default_prompts_held_out = False  # the paraphrase attack starts from held-out paraphrases
    config_defaults: dict = {}  # overrides of the config's defaults for this name (unlearndiff: the hard variant)

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_class(**self.config_defaults)

    def prepare(self, run: AttackRun) -> None:
        """Work done once per run, before the prompts."""

    def attack_prompt(self, run: AttackRun, prompt: str, index: int) -> AdversarialPrompt:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ files
def load_adversarial(path) -> Conditioning:
    """The adversarial conditioning saved for one prompt (``OUT/prompts/NNN.safetensors``), ready for ``model.sample``."""
    tensors = load_file(str(path))
    if "hidden_states" not in tensors:
        raise ErasekitError(f"{path} holds no adversarial conditioning; pass an OUT/prompts/NNN.safetensors of an attack")
    added = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("added.")} or None
    return Conditioning(tensors["hidden_states"], added)


def _images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _describe_erasures(erasures) -> list[dict]:
    return [{"method": e.method, "concepts": list(e.concepts), "fingerprint": e.fingerprint} for e in erasures]


def _write_grid(records: list[dict], out: Path) -> str | None:
    rows, labels = [], []
    for record in records:
        tensors = load_file(str(out / record["embedding"]))
        rows.append(tensors["images"].float() / 255)
        labels.append(f"{record['index']:03d} {sum(record['successes'])}/{len(record['successes'])}")
    if not rows:
        return None
    width = max(r.shape[0] for r in rows)
    padded = [torch.cat([r, torch.ones(width - r.shape[0], *r.shape[1:])]) if r.shape[0] < width else r for r in rows]
    side = padded[0].shape[-1]
    grid = image_grid(torch.cat(padded), rows=len(padded), labels=labels, scale=max(1, 96 // side))
    return save_png(out / "grid.png", grid).name


# ------------------------------------------------------------------------------------ the loop
def _read_record(path: Path) -> dict | None:
    """A finished prompt's record, or None when it is missing or damaged (the prompt is attacked again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("successes"), list):
        return None
    return record


def execute(attack: Attack, model, erasures, concept: str, prompts=None, judge: Judge | None = None, seed: int = 0,
            out=None, progress: bool = True, force: bool = False) -> dict:
    """Run ``attack`` over the prompts and return (and write to ``out/result.json``) the result."""
    config = attack.config
    concept = concept.strip()
    if not concept:
        raise ErasekitError("no concept; pass the erased concept (e.g. --concept triangle)")
    if isinstance(prompts, (str, os.PathLike)):
        prompts = read_prompt_file(prompts)
    prompts = list(prompts) if prompts is not None else default_prompts(model, concept, attack.default_prompts_held_out)
    if not prompts:
        raise ErasekitError("no prompts to attack; pass prompts= or --prompts FILE")
    if config.prompts is not None:
        prompts = prompts[: config.prompts]
    for prompt in prompts:
        model.check_prompt_fits(prompt)
    if judge is None or isinstance(judge, str):  # None: the model's default; a string: a spec such as classifier:PATH
        judge = make_judge(judge, model=model, concept=concept)
    judge_info = judge_record(judge, concept)  # a built-in judge checks here that it knows the concept
    erasures = list(erasures or [])

    out = Path(out) if out is not None else None
    settings = {
        "attack": attack.name, "concept": concept, "budget": dataclasses.asdict(config), "seed": seed,
        "model": model.name, "erasures": _describe_erasures(erasures), "prompts": prompts, "judge": judge_info,
    }
    if out is not None:
        run_file = out / "run.json"
        if run_file.is_file():
            try:
                previous = json.loads(run_file.read_text())
                if not isinstance(previous, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError) as error:
                raise ErasekitError(f"{run_file} is not a run record erasekit can read ({type(error).__name__}); "
                                    "use another --out, or delete the folder to start over") from None
            previous.get("budget", {}).pop("time_s", None)  # a new wall-clock budget is fine for a resumed run
            comparable = {**settings, "budget": {k: v for k, v in settings["budget"].items() if k != "time_s"}}
            if previous != comparable:
                changed = sorted(k for k in comparable if previous.get(k) != comparable[k])
                raise ErasekitError(
                    f"{out} holds a run with other settings ({', '.join(changed)} differ); "
                    "use another --out, or delete the folder to start over"
                )
    settings_kept = out is None  # run.json is written with the first result, so a run refused on the way leaves none
    sharded = distributed.is_distributed()  # several processes: each attacks its share of the prompts, process 0 merges
    if sharded and out is None:
        raise ErasekitError("an attack under several processes shares its prompts through the output folder; pass out= (--out)")

    for erasure in erasures:
        erasure.check_base(model, force)
    run = AttackRun(model, erasures, concept, judge, config, seed, out, prompts, progress and distributed.is_main())
    records: list[dict] = []
    stopped = None
    applied_here = []  # the attacked erasures this run applied (the others were on already); off again at the end
    try:
        for erasure in erasures:
            if not any(e is erasure for e, _ in model.applied_erasures):
                erasure.apply(model, force=force)
                applied_here.append(erasure)
        todo = []
        for index, prompt in enumerate(prompts):
            record_path = out / "prompts" / f"{index:03d}.json" if out is not None else None
            record = _read_record(record_path) if record_path is not None else None
            if record is not None:
                records.append(record)
            else:
                todo.append((index, prompt))
        if sharded:
            distributed.start(model.device)
            distributed.barrier()  # every process has read the finished records before any process writes one
        if todo:
            with distributed.main_first():  # process 0 prepares first (what it saves, e.g. a learned token, the others read)
                attack.prepare(run)
                if sharded and distributed.is_main():
                    write_json(out / "run.json", settings)
            settings_kept = settings_kept or sharded
            todo = distributed.shard(todo)  # this process's share (all of it for one process)
        bar = tqdm(todo, desc=f"attack {attack.name}", disable=not progress or not distributed.is_main())
        for index, prompt in bar:
            if run.out_of_time():
                stopped = "time budget"
                break
            started = time.perf_counter()
            torch.manual_seed(sample_seed(seed, index, 20_011))
            found = attack.attack_prompt(run, prompt, index)
            seeds = [sample_seed(seed, index, k) for k in range(config.samples)]
            images = run.generate(found.conditioning, seeds)
            successes = [bool(s) for s in judge(images, concept)]
            record = {
                "index": index, "prompt": prompt, "adversarial_prompt": found.text, "embedding": None,
                "seeds": seeds, "successes": successes, "success_rate": sum(successes) / len(successes),
                "seconds": round(time.perf_counter() - started, 2), "info": found.info,
            }
            if not settings_kept:
                write_json(out / "run.json", settings)
                settings_kept = True
            if out is not None:
                tensors = {"hidden_states": found.conditioning.hidden_states, "images": _images_to_uint8(images)}
                for key, value in (found.conditioning.added or {}).items():
                    tensors[f"added.{key}"] = value
                tensors.update(found.tensors)
                record["embedding"] = f"prompts/{index:03d}.safetensors"
                save_safetensors(out / record["embedding"], {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                 {"prompt": prompt, "adversarial_prompt": found.text or ""})
                write_json(out / "prompts" / f"{index:03d}.json", record)
            records.append(record)
            done = [s for r in records for s in r["successes"]]
            bar.set_postfix(success=f"{sum(done)}/{len(done)}")
    finally:
        for erasure in reversed(applied_here):
            erasure.remove(model)

    if sharded:  # process 0 merges every process's records, read back from out/prompts/
        distributed.barrier()
        records = [r for r in (_read_record(out / "prompts" / f"{i:03d}.json") for i in range(len(prompts))) if r is not None]
        if stopped is None and len(records) < len(prompts):
            stopped = "time budget"  # (another process ran out of time)
        if not distributed.is_main():
            distributed.barrier()  # process 0 writes result.json
            return json.loads((out / "result.json").read_text())
    records.sort(key=lambda r: r["index"])
    all_successes = [s for r in records for s in r["successes"]]
    result = {
        "attack": attack.name,
        "concept": concept,
        "success_rate": (sum(all_successes) / len(all_successes)) if all_successes else 0.0,
        "n": len(all_successes),
        "success_rate_ci95": rate_record(sum(all_successes), len(all_successes))["ci95"],
        "judge": judge_info,
        "budget": dataclasses.asdict(config),
        "seed": seed,
        "model": model.name,
        "erasures": _describe_erasures(erasures),
        "prompts_total": len(prompts),
        "prompts_done": len(records),
        "complete": len(records) == len(prompts),
        "stopped": stopped,
        "seconds": round(time.perf_counter() - run.started, 2),
        "per_prompt": records,
    }
    if out is not None:
        if not settings_kept:
            write_json(out / "run.json", settings)
        result["grid"] = _write_grid(records, out)
        texts = [r["adversarial_prompt"] for r in records if r.get("adversarial_prompt")]
        if texts:  # discrete attacks: a prompt file for `erasekit generate --prompts`
            write_text(out / "adversarial_prompts.txt", "".join(t.replace("\n", " ") + "\n" for t in texts))
            result["adversarial_prompts"] = "adversarial_prompts.txt"
        write_json(out / "result.json", result)
    if sharded:
        distributed.barrier()  # result.json is written; the other processes return it too
    if progress and distributed.is_main():
        where = f" ({out / 'result.json'})" if out is not None else ""
        print(f"{attack.name} on {concept!r}: success rate {result['success_rate']:.1%} of {result['n']} images{where}")
    return result
