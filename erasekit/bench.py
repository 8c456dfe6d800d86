"""``erasekit bench``: methods x concepts x attacks on the toy model or a real one, written up as a report.

A benchmark is described by a small TOML file (see ``erasekit/data/bench_default.toml``)::

    methods = ["uce", "esd"]
    concepts = ["triangle", "stripes"]        # toy shapes or styles (or colours)
    attacks = ["paraphrase", "soft-prompt"]
    samples_per_prompt = 2

    [attack_budgets.soft-prompt]             # passed to erasekit.attacks.run_attack as budget=
    steps = 5

    [quick]                                  # overrides used by --quick
    samples_per_prompt = 1

Every key of the file is a field of :class:`BenchConfig`; an unknown key is an error.

On a real model (``model`` a Stable Diffusion folder) the concepts are SD concepts with kinds, the
evaluation is a judge's (``judge = "classifier:PATH"``, ``"clip:PATH"`` or ``"nudenet"``) on prompt
files, and the attacks use the same judge::

    model = "./sd15"
    judge = "classifier:./resnet-50"          # see erasekit.eval.judges
    concepts = ["tench", "church"]
    kinds = { tench = "object", church = "object" }          # where the bundled lists cannot tell
    efficacy_prompts = { tench = "prompts/tench.txt" }      # default: the kind's templates
    locality_prompts = "prompts/imagenette.csv"   # default: the other concepts' efficacy prompts
    attack_prompts = { tench = "prompts/tench-attack.txt" } # default: the efficacy prompts

Relative paths are read from the TOML file's folder when they exist there. Efficacy = share of the
efficacy prompts' images the judge says show the erased concept; locality = share of the locality
prompts' images that show the concept each prompt names (a CSV ``concept`` column, else the bench
concept or judge class named in the prompt); the erased concept's own prompts are left out.

The run writes into ``OUT``::

    erasures/<method>-<concept>.safetensors    the erasures (reused when present)
    evaluations/<method>-<concept>.json        toy-classifier evaluation + timings ("original" = unerased)
    attacks/<method>-<concept>/<attack>/       the attack's own folder (result.json, grid, adversarial prompts)
    attacks/<method>-<concept>/<attack>.json   the attack's result and its cost, as the bench cached it
    images/<method>-<concept>.png              before/after grids (one row per value of the concept's attribute)
    results.json, report.md, index.html, plots/   see erasekit.eval.report

Every unit of work (an erasure, an evaluation, an attack) is cached on disk with the settings it
was computed with (for evaluations and attacks, also a hash of the erasure file): rerunning after
an interruption skips finished units, and a unit whose settings changed is computed again.

Under ``torchrun --nproc_per_node N -m erasekit.cli bench ...`` (or ``accelerate launch``;
:mod:`erasekit.distributed`) the (method, concept) cells, the unerased "original" cells among them,
are shared out by rank, each process on its own device: a process computes its cells whole (erasure,
evaluation, grid, attacks, the attacks not split further) and writes their files as one process
does, so no file is written by two. When every process is done, process 0 reads the cells back and
writes ``results.json`` and the report, the same (timings aside) as one process's. Units are keyed by
their settings, not by the process, so a rerun resumes with any number of processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from erasekit import distributed
from erasekit.config import check_config, parse_config
from erasekit.errors import ErasekitError
from erasekit.toy import world
from erasekit.utils import WriteError, image_grid, save_png, write_json

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CONFIG = DATA_DIR / "bench_default.toml"
DEMO_CONFIG = DATA_DIR / "bench_demo.toml"
RESULTS_FORMAT = 1


@dataclass
class BenchConfig:
    """What a benchmark runs. Defaults are small; the shipped TOML files set every field explicitly."""

    methods: list[str] = field(default_factory=lambda: ["uce"], metadata={"help": "The erasure methods to run."})
    concepts: list[str] = field(default_factory=lambda: ["triangle"], metadata={
        "help": "Toy concepts to erase: shapes, styles (key or caption adjective) or colours."})
    attacks: list[str] = field(default_factory=lambda: ["paraphrase"], metadata={"help": "The attacks run on every erasure."})
    name: str = field(default="erasekit benchmark", metadata={"help": "The benchmark's title in the report."})
    model: str = field(default="toy", metadata={"help": "The base model: 'toy', or a Stable Diffusion / SDXL folder."})
    device: str | None = field(default=None, metadata={"help": "Real models: cpu (default), cuda, cuda:1, mps."})
    dtype: str | None = field(default=None, metadata={"help": "Real models: float32 (default), float16 or bfloat16."})
    guidance: float | None = field(default=None, metadata={
        "help": "Real models: guidance of the evaluation images (none: the model's).", "min": 0})
    steps: int | None = field(default=None, metadata={
        "help": "Real models: sampling steps of the evaluation images (none: the model's).", "min": 1})
    judge: str = field(default="", metadata={
        "help": "Real models: nudenet, nudenet-0.45, classifier:PATH or clip:PATH (empty: NudeNet for nudity; the toy model "
                "always uses the toy protocol)."})
    judge_labels: dict[str, str | int] = field(default_factory=dict, metadata={
        "help": "classifier judge: per concept, the class that is the concept (a label or an index; default: its name)."})
    judge_top_k: int | None = field(default=None, metadata={"help": "classifier judge: top-k (none: the protocol's, 1).", "min": 1})
    judge_threshold: float | None = field(default=None, metadata={
        "help": "clip judge: probability the concept needs (none: it must win); nudenet: detection score.", "min": 0, "max": 1})
    judge_alternatives: str = field(default="", metadata={
        "help": "clip judge: a file (one name a line) or bundled list the concepts are compared with (empty: per kind)."})
    kinds: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Real models: per concept, object, artist, person or nudity (default: what the bundled lists tell)."})
    efficacy_prompts: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Real models: per concept, a prompt file naming it (default: the first prompts_per_concept templates of its kind)."})
    locality_prompts: str = field(default="", metadata={
        "help": "Real models: a prompt file of other concepts, a CSV with prompt and concept columns or prompts naming them "
                "(default: the other concepts' efficacy prompts)."})
    attack_prompts: dict[str, str] = field(default_factory=dict, metadata={
        "help": "Real models: per concept, the prompts the attacks start from (default: its efficacy prompts)."})
    preset: str = field(default="toy", metadata={"help": "The preset of every method's config."})
    attack_budgets: dict[str, dict] = field(default_factory=dict, metadata={
        "help": "Per attack name: the budget handed to run_attack (keys such as steps, prompts, samples, time_s)."})
    attack_original: bool = field(default=False, metadata={"help": "Also attack the unerased model (the attacks' ceiling)."})
    erase_seed: int = field(default=0, metadata={"help": "Seed of the erasures."})
    evaluate_seed: int = field(default=0, metadata={"help": "Seed of the evaluation images."})
    attack_seed: int = field(default=0, metadata={"help": "Seed of the attacks."})
    samples_per_prompt: int = field(default=2, metadata={"help": "Evaluation images per prompt.", "min": 1})
    prompts_per_concept: int = field(default=4, metadata={"help": "Evaluation prompts naming the erased concept.", "min": 1})
    prompts_per_other_value: int = field(default=2, metadata={
        "help": "Evaluation prompts per other value of the concept's attribute (locality).", "min": 1})
    held_out_per_word: int = field(default=2, metadata={"help": "Evaluation prompts per held-out paraphrase.", "min": 1})
    grid_seeds: int = field(default=4, metadata={"help": "Columns of the before/after grids.", "min": 1})

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "BenchConfig":
        """The config from TOML (or Python) values, typed and checked by the fields; ``source`` names the file."""
        return parse_config(cls, values, source=source, strings=False)

    @classmethod
    def from_toml(cls, path: str | Path, quick: bool = False) -> "BenchConfig":
        """Read a TOML file; with ``quick``, its ``[quick]`` table overrides the top-level keys."""
        path = Path(path)
        if not path.is_file():
            raise ErasekitError(f"benchmark config {path} does not exist; pass --config FILE (see {DEFAULT_CONFIG.name})")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ErasekitError(f"{path} is not valid TOML ({error}); fix the file") from None
        overrides = values.pop("quick", {})
        if quick:
            budgets = dict(values.get("attack_budgets", {}))
            for attack, budget in overrides.pop("attack_budgets", {}).items():
                budgets[attack] = {**budgets.get(attack, {}), **budget}
            values.update(overrides)
            if budgets:
                values["attack_budgets"] = budgets
        config = cls.from_dict(_paths_near(values, path.parent), source=str(path))
        config.validate()
        return config

    def validate(self) -> None:
        from erasekit.methods import METHODS

        if not self.methods or not self.concepts:
            raise ErasekitError("a benchmark needs at least one method and one concept; set methods = [...] and concepts = [...]")
        for method in self.methods:
            if method not in METHODS:
                raise ErasekitError(f"unknown method {method!r} in the benchmark config; choose from: {', '.join(METHODS)}")
        if self.model == "toy":
            real_only = [key for key in REAL_MODEL_KEYS
                         if getattr(self, key) not in ("", None, {}) and (key, getattr(self, key)) != ("judge", "toy")]
            if real_only:
                raise ErasekitError(f"{real_only[0]} applies to real models; on the toy model the toy protocol judges every concept "
                                    f"(remove {real_only[0]}, or set model to a Stable Diffusion folder)")
            for concept in self.concepts:
                toy_concept(concept)
        else:
            self.model_plan()  # the kinds, the judge, the prompt files: every one checked before any work
        for attack in self.attack_budgets:
            if attack not in self.attacks:
                raise ErasekitError(f"attack_budgets has {attack!r}, which is not in attacks = {self.attacks}; add it or remove its budget")
        if self.attacks:
            from erasekit.attacks import ATTACKS, make_attack

            for attack in self.attacks:
                if attack not in ATTACKS:
                    raise ErasekitError(f"unknown attack {attack!r} in the benchmark config; choose from: {', '.join(ATTACKS)}")
                try:
                    make_attack(attack, self.attack_budgets.get(attack))  # fails on a budget key the attack does not have
                except ErasekitError as error:
                    raise ErasekitError(f"attack_budgets.{attack}: {error}") from None
        check_config(self, "benchmark config")

    def model_plan(self) -> "ModelPlan":
        """Real models: the concepts with their kinds, the judge and every prompt list (all checked, nothing loaded)."""
        return plan_model_bench(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_bench_config(path: str | Path | None = None, quick: bool = False) -> BenchConfig:
    return BenchConfig.from_toml(path or DEFAULT_CONFIG, quick=quick)


# ---------------------------------------------------------------- concepts
@dataclass(frozen=True)
class ToyConcept:
    """A concept of the toy world: the attribute it is a value of, and the words a method erases."""

    name: str  # the world's key: "triangle", "stripes"
    attribute: str  # "shape", "style" or "color"
    erase_text: str  # what the method is given: the shape's name, the style's caption adjective ("striped")


def toy_concept(text: str) -> ToyConcept:
    """A toy concept for the bench (:func:`erasekit.toy.world.parse_concept`; the plain style is no concept to erase)."""
    attribute, value = world.parse_concept(text)
    if (attribute, value) == ("style", "plain"):
        raise ErasekitError(f"{text!r} is the toy world's absence of a style, not a concept to erase; choose a shape, a colour "
                            "or the stripes, dots or checkerboard style")
    return ToyConcept(value, attribute, world.concept_word(attribute, value))


# ------------------------------------------------------------ real models
REAL_MODEL_KEYS = ("device", "dtype", "guidance", "steps", "judge", "judge_labels", "judge_top_k", "judge_threshold",
                   "judge_alternatives", "kinds", "efficacy_prompts", "locality_prompts", "attack_prompts")


def _paths_near(values: dict, folder: Path) -> dict:
    """The TOML's relative paths that exist beside the file, made to point there (the others are kept as written)."""
    def near(text):
        if not isinstance(text, str) or not text or text == "toy" or Path(text).expanduser().is_absolute():
            return text
        return str(folder / text) if (folder / text).exists() else text

    values = dict(values)
    for key in ("model", "locality_prompts", "judge_alternatives"):
        if key in values:
            values[key] = near(values[key])
    for key in ("efficacy_prompts", "attack_prompts"):
        if isinstance(values.get(key), dict):
            values[key] = {concept: near(path) for concept, path in values[key].items()}
    if isinstance(values.get("judge"), str) and ":" in values["judge"]:
        name, _, path = values["judge"].partition(":")
        values["judge"] = f"{name}:{near(path)}"
    return values


@dataclass(frozen=True)
class ModelConcept:
    """A concept of a real model: its name, its kind (object, artist, person or nudity) and the text a method erases."""

    name: str
    attribute: str  # the kind (the report's column name for the toy world's attribute)
    erase_text: str


@dataclass
class ModelPlan:
    """What a real-model benchmark evaluates: per concept its efficacy, locality and attack prompts; one judge."""

    concepts: list[ModelConcept]
    efficacy: dict[str, list[str]]
    locality: dict[str, list[tuple[str, str]]]  # (prompt, the concept its images should show)
    attack: dict[str, list[str]]
    judge: object


def _prompt_rows(path: str, key: str) -> list[dict]:
    from erasekit.eval.generate import read_rows

    if not Path(path).expanduser().is_file():
        raise ErasekitError(f"{key}: prompt file {path} does not exist; fix the path (relative paths are read from the TOML file's folder)")
    rows = [row for row in read_rows(str(Path(path).expanduser())) if row.get("prompt")]
    if not rows:
        raise ErasekitError(f"{key}: {path} holds no prompts; write one prompt a line, or a CSV with a prompt column")
    return rows


def plan_model_bench(config: BenchConfig) -> ModelPlan:
    """The plan of a real-model benchmark, every key checked (one line naming it) before anything is loaded."""
    from erasekit.eval.judges import concept_kind, concept_named_in, make_judge, name_key
    from erasekit.eval.protocols import IMAGENETTE_CLASSES
    from erasekit.models.loading import checked_device
    from erasekit.targets import SD_KINDS, read_list

    model = config.model
    if (model.startswith((".", "/", "~")) or model.count("/") != 1) and not Path(model).expanduser().exists():
        raise ErasekitError(f"model = {model!r}: no such folder; set model to a Stable Diffusion folder (saved with save_pretrained) "
                            "or \"toy\"")
    if config.dtype not in (None, "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"):
        raise ErasekitError(f"dtype = {config.dtype!r}: not a dtype erasekit loads models in; use float32, float16 or bfloat16")
    checked_device(config.device)
    for key in ("kinds", "judge_labels", "efficacy_prompts", "attack_prompts"):
        for concept in getattr(config, key):
            if concept not in config.concepts:
                raise ErasekitError(f"{key} has {concept!r}, which is not in concepts = {config.concepts}; add it or remove its entry")
    concepts = []
    for name in config.concepts:
        kind = concept_kind(name, config.kinds.get(name))
        if kind is None:
            raise ErasekitError(f"the bundled lists do not tell what kind of concept {name!r} is; add {json.dumps(name)} = \"object\" "
                                "(or artist, person, nudity) to kinds")
        concepts.append(ModelConcept(name, kind, name))

    spec = config.judge.strip()
    if spec.lower() == "toy":
        raise ErasekitError("judge = \"toy\" judges the toy world's pictures only; "
                            "on this model set judge to classifier:PATH, clip:PATH or nudenet")
    if not spec:
        other = next((c.name for c in concepts if c.attribute != "nudity"), None)
        if other is not None:
            raise ErasekitError(f"the benchmark on a real model needs a judge for {other!r}: set judge = \"classifier:PATH\" "
                                "(a local image classifier) or \"clip:PATH\" (a local CLIP) in the config, or pass --judge; "
                                "NudeNet judges nudity without one")
        spec = "nudenet"
    protocol = None
    if spec.lower().startswith("classifier:"):
        in_imagenette = all(name_key(c.name) in {name_key(n) for n in IMAGENETTE_CLASSES} for c in concepts)
        protocol = "imagenette-top1" if in_imagenette else "classifier-top1"
    try:
        judge = make_judge(spec, labels=config.judge_labels or None, kinds={c.name: c.attribute for c in concepts},
                           top_k=config.judge_top_k, threshold=config.judge_threshold, alternatives=config.judge_alternatives or None,
                           protocol=protocol, device=config.device)
        for concept in concepts:
            judge.record(concept.name)  # its label, its alternatives
    except ErasekitError as error:
        raise ErasekitError(f"judge = {spec!r}: {error}") from None

    efficacy, attack = {}, {}
    for concept in concepts:
        if concept.name in config.efficacy_prompts:
            rows = _prompt_rows(config.efficacy_prompts[concept.name], f"efficacy_prompts.{concept.name}")
            efficacy[concept.name] = [row["prompt"] for row in rows]
        else:
            templates = [t for t in read_list(SD_KINDS[concept.attribute]["templates"], "templates") if t.strip() != "{}"]
            efficacy[concept.name] = [t.format(concept.name) for t in templates[: config.prompts_per_concept]]
        attack[concept.name] = efficacy[concept.name]
        if concept.name in config.attack_prompts:
            rows = _prompt_rows(config.attack_prompts[concept.name], f"attack_prompts.{concept.name}")
            attack[concept.name] = [row["prompt"] for row in rows]

    if config.locality_prompts:
        candidates = [c.name for c in concepts] + list(getattr(judge, "known_concepts", lambda: [])())
        rows = []
        for index, row in enumerate(_prompt_rows(config.locality_prompts, "locality_prompts"), 1):
            named = row.get("concept") or concept_named_in(row["prompt"], candidates)
            if not named:
                raise ErasekitError(f"locality_prompts: prompt {index} of {config.locality_prompts} ({row['prompt']!r}) names no concept "
                                    "the judge knows; add a concept column (CSV) or name one of the benchmark's concepts")
            rows.append((row["prompt"], named))
        try:
            for named in dict.fromkeys(n for _, n in rows):
                judge.record(named)
        except ErasekitError as error:
            raise ErasekitError(f"locality_prompts: {error}") from None
        locality = {c.name: [(p, n) for p, n in rows if name_key(n) != name_key(c.name)] for c in concepts}
    else:
        locality = {c.name: [(p, o.name) for o in concepts if o is not c for p in efficacy[o.name]] for c in concepts}
    return ModelPlan(concepts, efficacy, locality, attack, judge)


@torch.no_grad()
def evaluate_with_judge(model, concept: ModelConcept, plan: ModelPlan, config: BenchConfig, progress: bool = True) -> dict:
    """Real models: ``samples_per_prompt`` images per efficacy and locality prompt (seeds from the evaluate seed,
    the prompt's index and the sample's), each judged as the concept its prompt should show."""
    from tqdm.auto import tqdm

    from erasekit.eval.judges import judge_record
    from erasekit.eval.stats import rate_record
    from erasekit.utils import sample_seed

    def judged(rows: list[tuple[str, str]], offset: int, what: str) -> list[dict]:
        records = []
        for index, (prompt, shows) in enumerate(tqdm(rows, desc=f"{what} {concept.name}", disable=not progress, leave=False)):
            seeds = [sample_seed(config.evaluate_seed, offset + index, k) for k in range(config.samples_per_prompt)]
            images = model.generate([prompt] * len(seeds), seeds, guidance=config.guidance, num_inference_steps=config.steps)
            records.append({"prompt": prompt, "concept": shows, "seeds": seeds, "shown": [bool(v) for v in plan.judge(images, shows)]})
        return records

    def summary(records: list[dict]) -> dict:
        verdicts = [v for r in records for v in r["shown"]]
        return rate_record(sum(verdicts), len(verdicts))

    efficacy = judged([(p, concept.name) for p in plan.efficacy[concept.name]], 0, "efficacy")
    locality = judged(plan.locality[concept.name], 100_000, "locality")
    per_concept = {}
    for record in locality:
        per_concept.setdefault(record["concept"], []).append(record)
    efficacy_rate = summary(efficacy)
    locality_rate = summary(locality) if locality else None
    judge = judge_record(plan.judge, concept.name)
    return {
        "erased_accuracy": efficacy_rate["rate"],
        "other_accuracy": None if locality_rate is None else locality_rate["rate"],
        "held_out_accuracy": None,
        "toy_fid": None,
        "counts": {"erased": efficacy_rate, "other": locality_rate},
        "protocol": judge.get("protocol"),
        "judge": judge,
        "details": {"efficacy": efficacy, "locality": locality,
                    "locality_by_concept": {name: summary(records) for name, records in per_concept.items()}},
    }


# -------------------------------------------------------------- evaluation
def evaluate_concept(model, concept: ToyConcept, config: BenchConfig, progress: bool = True) -> dict:
    """The bench's one call into evaluation: the ``toy`` protocol (erasekit.eval.toy) with the
    config's sample counts and seed. Accuracy on the concept, on the other values of its
    attribute, on held-out paraphrases, the toy FID, and the protocol record."""
    from erasekit.eval.protocols import get_protocol
    from erasekit.eval.toy import evaluate_toy_protocol

    protocol = dataclasses.replace(get_protocol("toy"), samples_per_prompt=config.samples_per_prompt, seed=config.evaluate_seed,
                                   prompts_per_concept=config.prompts_per_concept,
                                   prompts_per_other_value=config.prompts_per_other_value, held_out_per_word=config.held_out_per_word)
    result = evaluate_toy_protocol(model, [concept.name], protocol=protocol, progress=progress)
    rates = result["rates"]
    return {
        "counts": {"erased": rates["erased"][concept.name], "other": rates["other"][concept.attribute],
                   "held_out": rates["held_out"][concept.name]},  # images and 95% intervals
        "erased_accuracy": result["erased_accuracy"],
        "other_accuracy": result["other_accuracy"],
        "held_out_accuracy": result["held_out_accuracy"],
        "toy_fid": result["toy_fid"],
        "protocol": result["protocol"],
        "details": {key: result[key] for key in ("images", "guidance", "steps", "erased", "held_out", "other", "other_by_value") if key in result},
    }


def model_grid_prompts(concept: ModelConcept, plan: ModelPlan) -> list[str]:
    """Real models: the concept's first efficacy prompt, then the first locality prompt of up to three other concepts."""
    others = {}
    for prompt, shows in plan.locality[concept.name]:
        others.setdefault(shows, prompt)
    return plan.efficacy[concept.name][:1] + list(others.values())[:3]


def grid_prompts(concept: ToyConcept) -> list[str]:
    """One prompt per value of the concept's attribute (the erased one among them), others fixed."""
    prompts = []
    for index, value in enumerate(world.ATTRIBUTES[concept.attribute]):
        if concept.attribute == "shape":
            prompts.append(world.canonical_prompt(value, world.COLOR_NAMES[index % 6], "plain"))
        elif concept.attribute == "style":
            prompts.append(world.canonical_prompt("circle" if concept.name != "circle" else "square", world.COLOR_NAMES[index % 6], value))
        else:
            prompts.append(world.canonical_prompt(world.SHAPES[index % 6], value, "plain"))
    return prompts


@torch.no_grad()
def write_grid(model, prompts: list[str], seeds: list[int], path: Path, guidance: float | None = None, steps: int | None = None) -> Path:
    """A PNG grid, one row per prompt and one column per seed, generated in one batch."""
    images = model.generate([p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds], guidance=guidance,
                            num_inference_steps=steps)
    return save_png(path, image_grid(images, rows=len(prompts), labels=prompts))


# ------------------------------------------------------------------ runner
def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # a torn write from an older run: recompute


def _file_digest(path: Path) -> str:
    """A short content hash: cached results name the erasure file they were computed with."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _versions() -> dict:
    import diffusers
    import transformers

    from erasekit.version import __version__

    return {"erasekit": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "platform": platform.platform()}


class _Progress:
    """Numbered stage lines: '[3/17] erase esd / triangle ...' then the time it took ('rank 1/2 ' before them
    under several processes)."""

    def __init__(self, total: int, enabled: bool, prefix: str = ""):
        self.total, self.done, self.enabled, self.start, self.prefix = total, 0, enabled, time.perf_counter(), prefix

    def stage(self, text: str) -> None:
        self.done += 1
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"{self.prefix}[{self.done}/{self.total} {elapsed:6.0f}s] {text}", flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"{self.prefix}    {text}", flush=True)


def run_bench(config: BenchConfig, out: str | Path = "report", progress: bool = True) -> Path:
    """Run the benchmark into ``out`` (resumable) and write the report; returns the path of index.html.

    Under several processes each computes its share of the cells and process 0 writes the report; every
    process returns when it is written.
    """
    from erasekit.erasure import Erasure
    from erasekit.eval.report import write_report
    from erasekit.models.loading import load_model
    from erasekit.methods import build_config
    from erasekit.resolve import erase

    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()
    sharded, main = distributed.is_distributed(), distributed.is_main()
    device = distributed.process_device(config.device)  # under torchrun / accelerate launch: this process's GPU
    # real models: kinds, judge, prompt lists (the judge on this process's device)
    plan = None if config.model == "toy" else plan_model_bench(dataclasses.replace(config, device=device))
    concepts = [toy_concept(c) for c in config.concepts] if plan is None else plan.concepts
    run_attack = _attack_runner()
    cells = [(method, concept) for concept in concepts for method in ("original", *config.methods)]  # one row each
    # this process's cells (all of them for one process); shared out with the methods' cells first, so the unerased
    # model's cells (evaluations only, cheap) even out what is left
    mine = distributed.shard(sorted(cells, key=lambda c: c[0] == "original") if sharded else cells)
    attacks_per_cell = {method: len(config.attacks) if method != "original" or config.attack_original else 0
                        for method in ("original", *config.methods)}
    n_stages = 1 + sum((1 if method == "original" else 2) + attacks_per_cell[method] for method, _ in mine) + main
    prefix = f"rank {distributed.rank()}/{distributed.world_size()} " if sharded else ""
    bar = _Progress(n_stages, progress, prefix)
    progress = progress and main  # the methods', evaluations' and attacks' own progress bars: process 0's only
    grid_seeds = list(range(config.grid_seeds))

    bar.stage(f"load the {config.model} model")
    clock = Stopwatch()
    torch.manual_seed(config.erase_seed)
    model = load_model(config.model, device=device, dtype=config.dtype)
    load_time = clock.read()

    def missing(path: Path):
        return ErasekitError(f"{path} is missing or was made with other settings after every process finished its cells; "
                             "rerun the benchmark to compute it")

    def evaluate_unit(key: str, concept: ToyConcept, erasure_id: str | None, bar: _Progress, reading: bool) -> dict:
        path, image = out / "evaluations" / f"{key}.json", out / "images" / f"{key}.png"
        settings = {"erasure": erasure_id, "samples_per_prompt": config.samples_per_prompt, "seed": config.evaluate_seed,
                    "prompts_per_concept": config.prompts_per_concept, "prompts_per_other_value": config.prompts_per_other_value,
                    "held_out_per_word": config.held_out_per_word, "grid_seeds": grid_seeds}
        if plan is not None:
            settings.update(judge=plan.judge.record(concept.name), efficacy=plan.efficacy[concept.name],
                            locality=[list(row) for row in plan.locality[concept.name]], guidance=config.guidance, steps=config.steps)
        cached = _read_json(path)
        if cached is not None and cached.get("settings") == settings and image.is_file():
            bar.note("cached")
            return cached
        if reading:
            raise missing(path)
        torch.manual_seed(config.evaluate_seed)  # a unit's numbers do not depend on the units computed before it
        clock = Stopwatch()
        if plan is None:
            metrics = evaluate_concept(model, concept, config, progress=progress)
        else:
            metrics = evaluate_with_judge(model, concept, plan, config, progress=progress)
        evaluate_time = clock.read()
        clock = Stopwatch()
        if plan is None:
            write_grid(model, grid_prompts(concept), grid_seeds, image)
        else:
            write_grid(model, model_grid_prompts(concept, plan), grid_seeds, image, guidance=config.guidance, steps=config.steps)
        grid_time = clock.read()
        record = {"key": key, "concept": concept.name, "settings": settings, **metrics, "image": f"images/{key}.png",
                  "seconds": {"evaluate": evaluate_time[0], "grid": grid_time[0]},
                  "cpu_seconds": {"evaluate": evaluate_time[1], "grid": grid_time[1]}}
        write_json(path, record)
        bar.note(_metrics_line(record))
        return record

    def erasure_unit(method: str, concept: ToyConcept, bar: _Progress, reading: bool) -> Erasure:
        path = out / "erasures" / f"{method}-{concept.name}.safetensors"
        settings = {"method": method, "concept": concept.erase_text, "preset": config.preset, "seed": config.erase_seed,
                    "config": dataclasses.asdict(build_config(method, config.preset, kind=concept.attribute))}  # (the preset's values)
        if plan is not None:
            settings["kind"] = concept.attribute
        if path.is_file():
            erasure = Erasure.load(path)
            if erasure.info.get("bench_settings") == settings:
                bar.note(f"reusing {path}")
                return erasure
        if reading:
            raise missing(path)
        torch.manual_seed(config.erase_seed)
        clock = Stopwatch()
        erasure = erase(model, method, [concept.erase_text], preset=config.preset, kind=None if plan is None else concept.attribute,
                        progress=progress)
        erasure.info["seconds"], erasure.info["cpu_seconds"] = clock.read()
        erasure.info["seed"] = config.erase_seed
        erasure.info["bench_settings"] = settings
        erasure.save(path)
        bar.note(f"{erasure.info['seconds']:.1f}s, {erasure.num_parameters:,} trainable values")
        return erasure

    def attack_unit(key: str, erasures: list, erasure_id: str | None, concept: ToyConcept, attack: str, bar: _Progress,
                    reading: bool) -> dict:
        path, folder = out / "attacks" / key / f"{attack}.json", out / "attacks" / key / attack
        settings = {"erasure": erasure_id, "budget": config.attack_budgets.get(attack), "seed": config.attack_seed}
        if plan is not None:
            settings.update(judge=plan.judge.record(concept.name), prompts=plan.attack[concept.name])
        cached = _read_json(path)
        if cached is not None and cached.get("settings") == settings:
            bar.note("cached")
            return cached
        if reading:
            raise missing(path)
        marker = folder / "bench-settings.json"
        if folder.is_dir() and _read_json(marker) != settings:
            shutil.rmtree(folder)  # made with other settings: the attack's own resume must not pick it up
        write_json(marker, settings)
        torch.manual_seed(config.attack_seed)
        clock = Stopwatch()
        try:
            real = {} if plan is None else {"prompts": plan.attack[concept.name], "judge": plan.judge}
            result = run_attack(model, erasures, concept=concept.name, attack=attack, out=folder,
                                budget=config.attack_budgets.get(attack), seed=config.attack_seed, progress=progress, **real)
            record = {"attack": attack, "success_rate": result.get("success_rate"), "n": result.get("n"),
                      "ci95": result.get("success_rate_ci95"),
                      "budget": result.get("budget"), "seed": result.get("seed", config.attack_seed),
                      "result": f"attacks/{key}/{attack}/result.json"}
        except WriteError:  # a full disk is not a property of the attack: stop, record nothing
            raise
        except ErasekitError as error:  # e.g. an attack that does not support this kind of concept
            record = {"attack": attack, "success_rate": None, "error": str(error)}
        record["settings"] = settings
        record["seconds"], record["cpu_seconds"] = clock.read()
        write_json(path, record)
        bar.note(f"success rate {_percent(record['success_rate'])}" if "error" not in record else f"not run: {record['error']}")
        return record

    def cell(method: str, concept: ToyConcept, bar: _Progress, reading: bool = False) -> dict:
        """One row: the unerased model's evaluation (and attacks), or a method's erasure, evaluation and attacks.
        ``reading``: every unit from its files (a missing one is an error), nothing computed."""
        key = f"{method}-{concept.name}"
        if method == "original":
            bar.stage(f"evaluate the unerased model on {concept.name!r}")
            baseline = evaluate_unit(key, concept, None, bar, reading)
            attacks = {}
            for attack in config.attacks if config.attack_original else []:
                bar.stage(f"attack the unerased model on {concept.name!r} with {attack}")
                attacks[attack] = attack_unit(key, [], None, concept, attack, bar, reading)
            return _row("original", concept, baseline, None, attacks)
        bar.stage(f"erase {concept.name!r} ({concept.erase_text!r}) with {method}")
        erasure = erasure_unit(method, concept, bar, reading)
        erasure_id = _file_digest(out / "erasures" / f"{key}.safetensors")
        bar.stage(f"evaluate {method} on {concept.name!r}")
        erasure.apply(model)
        try:
            evaluation = evaluate_unit(key, concept, erasure_id, bar, reading)
        finally:
            erasure.remove(model)
        attacks = {}
        for attack in config.attacks:
            bar.stage(f"attack {method} on {concept.name!r} with {attack}")
            attacks[attack] = attack_unit(key, [erasure], erasure_id, concept, attack, bar, reading)
        return _row(method, concept, evaluation, erasure, attacks)

    if sharded:
        distributed.start(device)
    # this process's cells; an erasure or attack inside one runs as one process would (its work is not split further)
    with distributed.alone():
        rows = [cell(method, concept, bar) for method, concept in mine]
    if sharded:
        distributed.barrier()  # every cell's files are written
        if not main:
            distributed.barrier()  # process 0 writes the report
            return out / "index.html"
        rows = [cell(method, concept, _Progress(0, False), reading=True) for method, concept in cells]

    bar.stage("write the report")
    results = {
        "format": RESULTS_FORMAT,
        "name": config.name,
        "model": config.model,
        "config": config.to_dict(),
        "protocol": next((r["protocol"] for r in rows if r.get("protocol")), None),
        **({} if plan is None else {"judge": plan.judge.record()}),
        "seeds": {"erase": config.erase_seed, "evaluate": config.evaluate_seed, "attack": config.attack_seed, "grid": grid_seeds},
        "versions": _versions(),
        "methods": list(config.methods),
        "concepts": [dataclasses.asdict(c) for c in concepts],
        "attacks": list(config.attacks),
        "rows": rows,
        "timings": _timings(rows, load_time, time.perf_counter() - wall_start),
    }
    write_json(out / "results.json", results)
    index = write_report(out)
    from erasekit.eval.report import undrawn_warnings

    for warning in undrawn_warnings(results):
        print(warning, file=sys.stderr)
    if progress:
        t = results["timings"]
        print(f"done: {t['this_run_seconds']:.0f}s in this run; every stage as first measured: "
              f"{t['seconds']['total']:.0f}s wall, {t['cpu_seconds']['total']:.0f}s CPU")
    distributed.barrier()  # (several processes) the others return now
    return index


def _attack_runner():
    from erasekit.attacks import run_attack

    return run_attack


def _row(method: str, concept: ToyConcept, evaluation: dict, erasure, attacks: dict) -> dict:
    return {
        "method": method,
        "concept": concept.name,
        "attribute": concept.attribute,
        "erased_accuracy": evaluation.get("erased_accuracy"),
        "other_accuracy": evaluation.get("other_accuracy"),
        "held_out_accuracy": evaluation.get("held_out_accuracy"),
        "toy_fid": evaluation.get("toy_fid"),
        "erase_seconds": None if erasure is None else erasure.info.get("seconds"),
        "erase_cpu_seconds": None if erasure is None else erasure.info.get("cpu_seconds"),
        "trainable_parameters": 0 if erasure is None else erasure.num_parameters,
        "attacks": attacks,
        "image": evaluation.get("image"),
        **({"counts": evaluation["counts"]} if evaluation.get("counts") else {}),  # real models: images and 95% intervals
        "evaluation": f"evaluations/{evaluation.get('key')}.json",
        "erasure": None if erasure is None else f"erasures/{method}-{concept.name}.safetensors",
        "seconds": evaluation.get("seconds", {}),
        "cpu_seconds": evaluation.get("cpu_seconds", {}),
        "protocol": evaluation.get("protocol"),
    }


def _timings(rows: list[dict], load_time: tuple[float, float], wall_seconds: float) -> dict:
    """Seconds per stage as measured when each unit was computed (cached units keep their first
    cost), as wall-clock ``seconds`` and as ``cpu_seconds`` of this process (on a shared machine the
    CPU time is the fairer measure of what a stage costs)."""

    def per_stage(kind: str, load: float) -> dict:
        erase_by_method: dict[str, float] = {}
        attack_by_name: dict[str, float] = {}
        evaluate = grid = 0.0
        for row in rows:
            if row.get(f"erase_{kind}") is not None:
                erase_by_method[row["method"]] = erase_by_method.get(row["method"], 0.0) + row[f"erase_{kind}"]
            evaluate += row.get(kind, {}).get("evaluate", 0.0)
            grid += row.get(kind, {}).get("grid", 0.0)
            for name, attack in row["attacks"].items():
                attack_by_name[name] = attack_by_name.get(name, 0.0) + (attack.get(kind) or 0.0)
        total = load + sum(erase_by_method.values()) + evaluate + grid + sum(attack_by_name.values())
        return {"load": round(load, 1), "erase": {k: round(v, 1) for k, v in erase_by_method.items()}, "evaluate": round(evaluate, 1),
                "grids": round(grid, 1), "attacks": {k: round(v, 1) for k, v in attack_by_name.items()}, "total": round(total, 1)}

    return {"seconds": per_stage("seconds", load_time[0]), "cpu_seconds": per_stage("cpu_seconds", load_time[1]),
            "this_run_seconds": round(wall_seconds, 1)}


class Stopwatch:
    """Wall-clock and process CPU seconds since creation."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return round(time.perf_counter() - self.wall, 2), round(time.process_time() - self.cpu, 2)


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _metrics_line(record: dict) -> str:
    return (f"concept {_percent(record.get('erased_accuracy'))}, others {_percent(record.get('other_accuracy'))}, "
            f"held-out {_percent(record.get('held_out_accuracy'))}"
            + (f", toy FID {record['toy_fid']:.2f}" if record.get("toy_fid") is not None else ""))

