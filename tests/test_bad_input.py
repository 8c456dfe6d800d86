"""Bad input, driven through the CLI in-process: for every case exit status 2, exactly one line on stderr
(``erasekit: error: ...``), no traceback, and nothing new or changed where the command would write."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from erasekit.cli import main
from erasekit.erasure import Erasure
from erasekit.models.loading import load_model
from erasekit.models.toy import toy_unet_config, write_toy_folder


def _random_toy(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    write_toy_folder(folder, UNet2DConditionModel(**toy_unet_config()), {"steps": 2})
    return folder


def _erasure(model_folder: Path, path: Path) -> Path:
    model = load_model(model_folder)
    name = next(iter(model.key_value_projections())) + ".weight"
    delta = torch.full_like(dict(model.unet.named_parameters())[name], 0.01)
    return Erasure.from_deltas(model, "uce", ["triangle"], {}, {name: delta}).save(path)


def _retagged(good: Path, path: Path, tensors=None, **meta_changes) -> Path:
    """A copy of the erasure ``good`` with other tensors and/or metadata fields."""
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        header, original = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["erasekit"])
    meta.update(meta_changes)
    save_file(original if tensors is None else tensors(original), str(path), metadata={"erasekit": json.dumps(meta)})
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """The inputs every case reads, in one folder (``w.root``) that the cases must leave untouched."""
    root = tmp_path_factory.mktemp("bad_input")
    inputs = root / "in"
    inputs.mkdir()
    toy, other = _random_toy(root / "toy", 0), _random_toy(root / "other_toy", 1)
    erasure = _erasure(toy, inputs / "good.safetensors")

    def write(name, content):
        path = inputs / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
        return path

    ns = SimpleNamespace(root=root, toy=toy, erasure=erasure, out=root / "out")
    ns.erasure_other = _erasure(other, inputs / "other.safetensors")
    ns.nan_erasure = _retagged(erasure, inputs / "nan.safetensors", lambda t: {k: torch.full_like(v, float("nan")) for k, v in t.items()})
    ns.huge_erasure = _retagged(erasure, inputs / "huge.safetensors", lambda t: {k: torch.full_like(v, 1e30) for k, v in t.items()})
    ns.int_erasure = _retagged(erasure, inputs / "int.safetensors", lambda t: {k: v.long() for k, v in t.items()})
    ns.empty_erasure = _retagged(erasure, inputs / "empty.safetensors", lambda t: {"other": torch.zeros(1)})
    ns.concepts_text = _retagged(erasure, inputs / "concepts.safetensors", concepts="triangle")
    ns.config_list = _retagged(erasure, inputs / "config.safetensors", config=[1, 2])
    ns.bad_signature = _retagged(erasure, inputs / "signature.safetensors", base_signature={"x": [1, 2]})
    ns.future_format = _retagged(erasure, inputs / "future.safetensors", format=99)
    ns.format_text = _retagged(erasure, inputs / "format.safetensors", format="one")
    ns.receler_damaged = _retagged(erasure, inputs / "receler.safetensors", lambda t: {"module.a.b.down.weight": torch.zeros(3)},
                                   module_type="receler", method="receler")
    ns.cpe_damaged = _retagged(erasure, inputs / "cpe.safetensors", lambda t: {"module.gate.query": torch.zeros(2, 3, 4),
                               "module.gate.scaler": torch.zeros(2, 3), "module.alpha": torch.ones(5)},
                               module_type="cpe", method="cpe")
    ns.no_metadata = inputs / "plain.safetensors"
    save_file({"delta.x": torch.zeros(2)}, str(ns.no_metadata))
    ns.garbage = write("garbage.safetensors", b"\x00\x01 this is no safetensors file")
    ns.pickle = write("model.ckpt", b"\x80\x04\x95 pickled")
    ns.text = write("notes.txt", "a note, not a folder")
    ns.binary_prompts = write("binary.txt", b"\xff\xfe\x00\x00garbage\x00")
    ns.no_prompt_column = write("noprompt.csv", "text,seed\na cat,1\n")
    ns.bad_seed = write("badseed.csv", "prompt,seed\na cat,twelve\n")
    ns.negative_seed = write("negseed.csv", "prompt,seed\na cat,-5\n")
    ns.dup_case = write("dupcase.csv", "prompt,case_number\na cat,1\na dog,1\n")
    ns.inf_guidance = write("infguidance.csv", "prompt,guidance\na cat,-1e309\n")
    ns.nan_guidance = write("nanguidance.csv", "prompt,guidance\na cat,nan\n")
    ns.huge_prompt = write("huge.txt", "a " * 20_000 + "\n")
    ns.empty_prompts = write("empty.txt", "\n\n  \n")
    ns.bad_toml = write("bad.toml", "[bench\nmethods = ")
    ns.folder_named_like_a_file = root / "folder.safetensors"
    ns.folder_named_like_a_file.mkdir()
    ns.bad_model_index = root / "bad_model_index"
    ns.bad_model_index.mkdir()
    (ns.bad_model_index / "model_index.json").write_text("{not json")

    # output folders that hold other work
    ns.foreign = root / "foreign"
    ns.foreign.mkdir()
    (ns.foreign / "00000_0.png").write_bytes(b"someone else's image")
    ns.made = root / "made"
    assert main(["generate", "--model", str(toy), "--prompt", "a red triangle", "--out", str(ns.made), "--steps", "2"]) == 0
    ns.bad_metadata = root / "badmeta"
    ns.bad_metadata.mkdir()
    (ns.bad_metadata / "metadata.jsonl").write_text("[1, 2]\n")
    (ns.bad_metadata / "00000_0.png").write_bytes((ns.made / "00000_0.png").read_bytes())
    ns.other_run = root / "other_run"
    ns.other_run.mkdir()
    (ns.other_run / "run.json").write_text(json.dumps({"attack": "p4d", "concept": "circle"}))
    ns.train_run = root / "train_run"
    (ns.train_run / "checkpoint").mkdir(parents=True)
    (ns.train_run / "checkpoint" / "state.json").write_text(json.dumps({"step": 5}))
    ns.garbage_run = root / "garbage_run"
    ns.garbage_run.mkdir()
    (ns.garbage_run / "run.json").write_text("{{{")
    return ns


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _erase(w, *extra):
    return ["erase", "--model", str(w.toy), "--method", "uce", "--concept", "triangle", "--out", str(w.out / "e"), *extra]


def _generate(w, *extra, out=None):
    return ["generate", "--model", str(w.toy), "--prompt", "a red triangle", "--out", str(out or w.out / "g"), "--steps", "2", *extra]


def _attack(w, *extra, out=None, concept="triangle"):
    return ["attack", "--model", str(w.toy), "--erasure", str(w.erasure), "--concept", concept, "--attack", "paraphrase",
            "--out", str(out or w.out / "a"), *extra]


CASES = {
    # erase: method, config, concept, output, model, device
    "erase unknown method": lambda w: _erase(w)[:4] + ["nope"] + _erase(w)[5:],
    "erase without --concept": lambda w: ["erase", "--method", "uce", "--out", str(w.out / "e")],
    "erase --set without =": lambda w: _erase(w, "--set", "preserve_scale"),
    "erase --set unknown key": lambda w: _erase(w, "--set", "nope=1"),
    "erase --set not a number": lambda w: _erase(w, "--set", "preserve_scale=abc"),
    "erase --set nan": lambda w: _erase(w, "--set", "preserve_scale=nan"),
    "erase --set negative": lambda w: _erase(w, "--set", "preserve_scale=-1"),
    "erase esd --set zero steps": lambda w: _erase(w, "--set", "iterations=0")[:4] + ["esd"] + _erase(w, "--set", "iterations=0")[5:],
    "erase --set absurdly large": lambda w: _erase(w, "--set", "preserve_scale=1e300"),
    "erase unknown preset": lambda w: _erase(w, "--preset", "nope"),
    "erase toy concept typo": lambda w: _erase(w)[:6] + ["trianglee"] + _erase(w)[7:],
    "erase empty concept": lambda w: _erase(w)[:6] + [" "] + _erase(w)[7:],
    "erase unknown kind": lambda w: _erase(w, "--kind", "vegetable"),
    "erase --out exists": lambda w: _erase(w)[:-1] + [str(w.erasure)],
    "erase --out exists without suffix": lambda w: _erase(w)[:-1] + [str(w.erasure.with_suffix(""))],
    "erase --out under a file": lambda w: _erase(w)[:-1] + [str(w.text / "e")],
    "erase --out is a folder": lambda w: _erase(w)[:-1] + [str(w.folder_named_like_a_file)],
    "erase missing model": lambda w: _erase(w)[:2] + [str(w.root / "nowhere")] + _erase(w)[3:],
    "erase model is a text file": lambda w: _erase(w)[:2] + [str(w.text)] + _erase(w)[3:],
    "erase model is a pickle": lambda w: _erase(w)[:2] + [str(w.pickle)] + _erase(w)[3:],
    "erase model_index.json not JSON": lambda w: _erase(w)[:2] + [str(w.bad_model_index)] + _erase(w)[3:],
    "erase device cuda without GPU": lambda w: _erase(w, "--device", "cuda"),
    "erase unknown device": lambda w: _erase(w, "--device", "banana"),
    "erase unknown dtype": lambda w: _erase(w, "--dtype", "fp8"),
    "erase negative seed": lambda w: _erase(w, "--seed", "-1"),
    # generate: prompts and prompt files
    "generate no prompts": lambda w: ["generate", "--model", str(w.toy), "--out", str(w.out / "g")],
    "generate missing prompt file": lambda w: _generate(w, "--prompts", str(w.root / "missing.csv")),
    "generate binary prompt file": lambda w: _generate(w, "--prompts", str(w.binary_prompts)),
    "generate CSV without prompt column": lambda w: _generate(w, "--prompts", str(w.no_prompt_column)),
    "generate CSV seed not a number": lambda w: _generate(w, "--prompts", str(w.bad_seed)),
    "generate CSV negative seed": lambda w: _generate(w, "--prompts", str(w.negative_seed)),
    "generate CSV duplicate case": lambda w: _generate(w, "--prompts", str(w.dup_case)),
    "generate CSV guidance -1e309": lambda w: _generate(w, "--prompts", str(w.inf_guidance)),
    "generate CSV guidance nan": lambda w: _generate(w, "--prompts", str(w.nan_guidance)),
    "generate prompt of 40,000 characters": lambda w: _generate(w, "--prompts", str(w.huge_prompt)),
    "generate blank prompt file": lambda w: ["generate", "--model", str(w.toy), "--prompts", str(w.empty_prompts), "--out", str(w.out / "g")],
    "generate unknown toy prompt set": lambda w: _generate(w, "--prompts", "toy:nope"),
    # generate: numbers
    "generate guidance nan": lambda w: _generate(w, "--guidance", "nan"),
    "generate guidance inf": lambda w: _generate(w, "--guidance", "inf"),
    "generate guidance text": lambda w: _generate(w, "--guidance", "high"),
    "generate zero steps": lambda w: _generate(w)[:-2] + ["--steps", "0"],
    "generate absurd steps": lambda w: _generate(w)[:-2] + ["--steps", "1e12"],
    "generate zero batch": lambda w: _generate(w, "--batch-size", "0"),
    "generate zero samples": lambda w: _generate(w, "--samples-per-prompt", "0"),
    "generate seed too large": lambda w: _generate(w, "--seed", str(2**40)),
    # generate: erasure files
    "generate missing erasure": lambda w: _generate(w, "--erasure", str(w.root / "missing.safetensors")),
    "generate erasure not safetensors": lambda w: _generate(w, "--erasure", str(w.garbage)),
    "generate erasure is a pickle": lambda w: _generate(w, "--erasure", str(w.pickle)),
    "generate erasure without metadata": lambda w: _generate(w, "--erasure", str(w.no_metadata)),
    "generate erasure NaN tensors": lambda w: _generate(w, "--erasure", str(w.nan_erasure)),
    "generate erasure 1e30 tensors": lambda w: _generate(w, "--erasure", str(w.huge_erasure)),
    "generate erasure integer tensors": lambda w: _generate(w, "--erasure", str(w.int_erasure)),
    "generate erasure with nothing in it": lambda w: _generate(w, "--erasure", str(w.empty_erasure)),
    "generate erasure concepts as text": lambda w: _generate(w, "--erasure", str(w.concepts_text)),
    "generate erasure config as list": lambda w: _generate(w, "--erasure", str(w.config_list)),
    "generate erasure bad signature": lambda w: _generate(w, "--erasure", str(w.bad_signature)),
    "generate erasure future format": lambda w: _generate(w, "--erasure", str(w.future_format)),
    "generate erasure format as text": lambda w: _generate(w, "--erasure", str(w.format_text)),
    "generate damaged Receler modules": lambda w: _generate(w, "--erasure", str(w.receler_damaged)),
    "generate damaged CPE modules": lambda w: _generate(w, "--erasure", str(w.cpe_damaged)),
    "generate same erasure twice": lambda w: _generate(w, "--erasure", str(w.erasure), "--erasure", str(w.erasure)),
    "generate erasure of another model": lambda w: _generate(w, "--erasure", str(w.erasure_other)),
    # generate: output folders
    "generate --out is a file": lambda w: _generate(w, out=w.text),
    "generate --out under a file": lambda w: _generate(w, out=w.text / "g"),
    "generate --out holds foreign images": lambda w: _generate(w, out=w.foreign),
    "generate --out made with another prompt": lambda w: ["generate", "--model", str(w.toy), "--prompt", "a blue circle", "--out",
                                                          str(w.made), "--steps", "2"],
    "generate --out made with other steps": lambda w: _generate(w, out=w.made)[:-2] + ["--steps", "3"],
    "generate --out made without the erasure": lambda w: _generate(w, "--erasure", str(w.erasure), out=w.made),
    "generate --out with damaged metadata": lambda w: _generate(w, out=w.bad_metadata),
    # attack
    "attack unknown attack": lambda w: _attack(w)[:8] + ["nope"] + _attack(w)[9:],
    "attack budget without =": lambda w: _attack(w, "--budget", "steps"),
    "attack budget unknown key": lambda w: _attack(w, "--budget", "nope=1"),
    "attack budget zero samples": lambda w: _attack(w, "--budget", "samples=0"),
    "attack budget not a number": lambda w: _attack(w, "--budget", "samples=many"),
    "attack budget nan time": lambda w: _attack(w, "--budget", "time_s=nan"),
    "attack budget absurd samples": lambda w: _attack(w, "--budget", "samples=1e15"),
    "attack empty concept": lambda w: _attack(w, concept=" "),
    "attack toy concept typo": lambda w: _attack(w, concept="trianglee"),
    "attack missing prompt file": lambda w: _attack(w, "--prompts", str(w.root / "missing.txt")),
    "attack binary prompt file": lambda w: _attack(w, "--prompts", str(w.binary_prompts)),
    "attack damaged erasure": lambda w: _attack(w)[:4] + [str(w.nan_erasure)] + _attack(w)[5:],
    "attack erasure of another model": lambda w: _attack(w)[:4] + [str(w.erasure_other)] + _attack(w)[5:],
    "attack --out holds another run": lambda w: _attack(w, out=w.other_run),
    "attack --out holds a damaged run.json": lambda w: _attack(w, out=w.garbage_run),
    "attack --out is a file": lambda w: _attack(w, out=w.text),
    # evaluate, toy, bench
    "evaluate unknown protocol": lambda w: ["evaluate", "--protocol", "nope"],
    "evaluate toy without concept": lambda w: ["evaluate", "--model", str(w.toy), "--protocol", "toy"],
    "evaluate nudenet without images": lambda w: ["evaluate", "--protocol", "nudenet", "--json", str(w.out / "r.json")],
    "evaluate nudenet missing folder": lambda w: ["evaluate", "--protocol", "nudenet", "--images", str(w.root / "none"),
                                                  "--json", str(w.out / "r.json")],
    "evaluate nudenet damaged metadata": lambda w: ["evaluate", "--protocol", "nudenet", "--images", str(w.bad_metadata),
                                                    "--json", str(w.out / "r.json")],
    "toy eval unknown prompt set": lambda w: ["toy", "eval", "--model", str(w.toy), "--prompts", "nope"],
    "toy eval zero samples": lambda w: ["toy", "eval", "--model", str(w.toy), "--samples-per-prompt", "0"],
    "toy grid zero seeds": lambda w: ["toy", "grid", "--model", str(w.toy), "--seeds", "0", "--out", str(w.out / "grid.png")],
    "toy grid --out under a file": lambda w: ["toy", "grid", "--model", str(w.toy), "--out", str(w.text / "grid.png")],
    "toy train zero steps": lambda w: ["toy", "train", "--out", str(w.out / "t"), "--steps", "0"],
    "toy train excludes an unknown concept": lambda w: ["toy", "train", "--out", str(w.out / "t"), "--exclude", "triangel"],
    "toy train over a run without --resume": lambda w: ["toy", "train", "--out", str(w.train_run)],
    "toy train excludes every shape": lambda w: ["toy", "train", "--out", str(w.out / "t"), "--exclude",
                                                 "circle,square,triangle,star,cross,heart"],
    "bench missing config": lambda w: ["bench", "--config", str(w.root / "missing.toml"), "--out", str(w.out / "b")],
    "bench config not TOML": lambda w: ["bench", "--config", str(w.bad_toml), "--out", str(w.out / "b")],
    "unknown command": lambda w: ["erasee"],
}


def test_there_are_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_costs_one_line_and_nothing_else(name, w, capsys):
    before = _snapshot(w.root)
    capsys.readouterr()
    try:
        code = main(CASES[name](w))
    except SystemExit as stop:  # argparse's checks
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit status {code}; stderr: {err[-500:]}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("erasekit: error: ") and "Traceback" not in err, err[-1500:]
    assert _snapshot(w.root) == before, "a refused command changed files"


def test_a_read_only_output_is_refused_before_any_work(w, capsys, monkeypatch):
    import erasekit.utils

    real = os.access
    monkeypatch.setattr(erasekit.utils.os, "access", lambda path, mode: False if "readonly" in str(path) else real(path, mode))
    readonly = w.root / "readonly"
    readonly.mkdir(exist_ok=True)
    before = _snapshot(w.root)
    for argv in (_erase(w)[:-1] + [str(readonly / "e")], _generate(w, out=readonly / "g"), _attack(w, out=readonly / "a")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "permission denied" in err[0]
    assert _snapshot(w.root) == before


def test_a_full_disk_is_refused_before_generating(w, capsys, monkeypatch):
    import collections

    import erasekit.utils

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(erasekit.utils.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 100))
    before = _snapshot(w.root)
    assert main(_generate(w, out=w.out / "full")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "free space" in err[0]
    assert _snapshot(w.root) == before
