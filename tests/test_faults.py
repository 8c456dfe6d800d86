"""Faults: kill -9 in the middle of generate and attack, a disk that fills up mid-write, two generate
processes on one folder. Work done is kept, a rerun finishes it with the results of an uninterrupted
run, and nothing is half-written."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from conftest import assert_same_picture
from erasekit.cli import main
from erasekit.erasure import Erasure
from erasekit.eval.generate import KEY_TEXT
from erasekit.models.loading import load_model
from erasekit.models.toy import toy_unet_config, write_toy_folder

# Runs the CLI with ModelHandle.generate slowed down (the numbers are untouched), so that a test can
# kill it, or run two of it side by side, mid-way.
SLOW_CLI = """
import sys, time
from erasekit.models.handle import ModelHandle

generate = ModelHandle.generate


def slow_generate(self, *args, **kwargs):
    time.sleep(float(sys.argv[1]))
    return generate(self, *args, **kwargs)


ModelHandle.generate = slow_generate
from erasekit.cli import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    write_toy_folder(folder, UNet2DConditionModel(**toy_unet_config()), {"steps": 2})
    return folder


@pytest.fixture(scope="module")
def erasure(toy, tmp_path_factory):
    model = load_model(toy)
    name = next(iter(model.key_value_projections())) + ".weight"
    delta = torch.full_like(dict(model.unet.named_parameters())[name], 0.02)
    return Erasure.from_deltas(model, "uce", ["triangle"], {}, {name: delta}).save(tmp_path_factory.mktemp("e") / "e.safetensors")


def _slow_cli(tmp_path: Path, delay: float, argv: list[str]) -> subprocess.Popen:
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the bits of this process
    return subprocess.Popen([sys.executable, str(script), str(delay), *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if ready():
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None and process.returncode is None and not ready():
            process.kill()
        _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run was not killed mid-way (status {process.returncode}): {err[-1500:]}"


def _pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*") if p.name.endswith((".claim", ".png", ".json", ".safetensors")) or ".tmp" in p.name]


def _generate_argv(toy, out, prompts=("a red triangle", "a blue circle", "a green square", "a yellow star"), samples=5):
    argv = ["generate", "--model", str(toy), "--out", str(out), "--steps", "2", "--batch-size", "1", "--samples-per-prompt", str(samples)]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    return argv


def test_generate_killed_mid_way_keeps_its_images_and_a_rerun_finishes_them_identically(toy, tmp_path, capsys):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert main(_generate_argv(toy, reference)) == 0
    capsys.readouterr()
    process = _slow_cli(tmp_path, 0.15, _generate_argv(toy, out))
    _kill_when(process, lambda: len(list(out.glob("0*.png"))) >= 4)
    kept = {p.name: p.read_bytes() for p in out.glob("0*.png")}
    assert 4 <= len(kept) < 20
    assert main(_generate_argv(toy, out)) == 0
    written = int(re.search(r"(\d+) new images", capsys.readouterr().out).group(1))
    assert written == 20 - len(kept)  # the kept images are not made again
    assert all((out / name).read_bytes() == data for name, data in kept.items())
    names = sorted(p.name for p in reference.glob("0*.png"))
    assert names == sorted(p.name for p in out.glob("0*.png")) and len(names) == 20
    for name in names:
        assert_same_picture(_pixels(out / name), _pixels(reference / name))
    assert _leftovers(out) == []  # the dead process's claim was taken over and let go


def test_a_claim_and_a_claim_draft_left_by_a_dead_process_are_taken_over_and_removed(toy, tmp_path, capsys):
    # what a process killed while claiming leaves: its claim (always with its owner: it is hard-linked from a draft
    # written first) and perhaps the draft; a rerun makes the image and leaves neither behind
    out = tmp_path / "claimed"
    assert main(_generate_argv(toy, out, prompts=("a red triangle",), samples=2)) == 0
    (out / "00000_1.png").unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = f"{socket.gethostname()} {dead.pid}"
    (out / ".00000_1.png.claim").write_text(owner)
    (out / f".00000_1.png.claim.{dead.pid}.tmp").write_text(owner)
    capsys.readouterr()
    assert main(_generate_argv(toy, out, prompts=("a red triangle",), samples=2)) == 0
    assert "1 new images" in capsys.readouterr().out
    assert (out / "00000_1.png").is_file() and _leftovers(out) == []


def test_two_generate_processes_on_one_folder_share_the_work(toy, tmp_path):
    out = tmp_path / "shared"
    argv = _generate_argv(toy, out, samples=8)
    first, second = _slow_cli(tmp_path, 0.1, argv), _slow_cli(tmp_path, 0.1, argv)
    results = [p.communicate(timeout=300) + (p.returncode,) for p in (first, second)]
    assert all(code == 0 for _, _, code in results), [err[-1000:] for _, err, _ in results]
    written = [int(re.search(r"(\d+) new images", stdout).group(1)) for stdout, _, _ in results]
    assert sum(written) == 32  # every image made once, by one of them
    keys = {json.loads(line)["file"]: json.loads(line)["key"] for line in (out / "metadata.jsonl").read_text().splitlines()}
    assert len(keys) == 32
    for name, key in keys.items():
        with Image.open(out / name) as image:
            assert image.text[KEY_TEXT] == key
    assert _leftovers(out) == []


def test_attack_killed_mid_way_resumes_to_the_uninterrupted_result(toy, erasure, tmp_path, capsys):
    def argv(out):
        return ["attack", "--model", str(toy), "--erasure", str(erasure), "--concept", "triangle", "--attack", "paraphrase",
                "--out", str(out), "--budget", "samples=2", "--seed", "3"]

    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert main(argv(reference)) == 0
    process = _slow_cli(tmp_path, 0.3, argv(out))
    _kill_when(process, lambda: len(list((out / "prompts").glob("*.json"))) >= 2 if (out / "prompts").is_dir() else False)
    kept = {p.name: p.read_bytes() for p in (out / "prompts").glob("*.json")}
    assert 2 <= len(kept) < 8 and not (out / "result.json").exists()
    assert main(argv(out)) == 0
    assert all((out / "prompts" / name).read_bytes() == data for name, data in kept.items())
    ours, theirs = (json.loads((folder / "result.json").read_text()) for folder in (out, reference))
    for key in ("success_rate", "n", "prompts_done", "complete"):
        assert ours[key] == theirs[key]
    assert [r["seeds"] for r in ours["per_prompt"]] == [r["seeds"] for r in theirs["per_prompt"]]
    assert [r["adversarial_prompt"] for r in ours["per_prompt"]] == [r["adversarial_prompt"] for r in theirs["per_prompt"]]
    assert _leftovers(out) == []


def test_a_disk_that_fills_up_mid_generate_costs_one_line_and_keeps_the_images_made(toy, tmp_path, capsys, monkeypatch):
    out = tmp_path / "full"
    saves, real_save = [], Image.Image.save

    def save(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 3:
            Path(fp).write_bytes(b"half an ima")  # the disk fills up half-way through the third image
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    assert main(_generate_argv(toy, out, samples=2)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("erasekit: error:")]  # (the other lines: the progress bar)
    assert len(errors) == 1 and "No space left on device" in errors[0] and "free space" in errors[0] and "Traceback" not in err
    assert len(list(out.glob("0*.png"))) == 2 and _leftovers(out) == []  # two whole images, no half-written one
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert main(_generate_argv(toy, out, samples=2)) == 0
    assert "6 new images" in capsys.readouterr().out


def test_a_disk_that_fills_up_while_saving_an_erasure_keeps_the_previous_file(erasure, tmp_path, monkeypatch):
    import erasekit.utils
    from erasekit.errors import ErasekitError

    path = tmp_path / "e.safetensors"
    path.write_bytes(erasure.read_bytes())

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(erasekit.utils, "save_file", full)
    with pytest.raises(ErasekitError, match="free space"):
        Erasure.load(erasure).save(path)
    assert path.read_bytes() == erasure.read_bytes() and sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]


BENCH_TOML = """
methods = ["uce"]
concepts = ["triangle", "circle"]
attacks = ["paraphrase"]
samples_per_prompt = 1
prompts_per_concept = 3
prompts_per_other_value = 1
held_out_per_word = 1
grid_seeds = 1
[attack_budgets.paraphrase]
prompts = 2
samples = 1
"""


@pytest.mark.slow
def test_bench_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    config = tmp_path / "bench.toml"
    config.write_text(BENCH_TOML)
    reference, out = tmp_path / "reference", tmp_path / "killed"
    assert main(["bench", "--config", str(config), "--out", str(reference)]) == 0
    process = _slow_cli(tmp_path, 0.2, ["bench", "--config", str(config), "--out", str(out)])
    _kill_when(process, lambda: (out / "erasures").is_dir() and any((out / "erasures").glob("uce-*.safetensors")))
    assert not (out / "results.json").exists()
    kept = {p.relative_to(out): p.read_bytes() for p in (out / "erasures").glob("*.safetensors")}
    assert main(["bench", "--config", str(config), "--out", str(out)]) == 0
    assert all((out / name).read_bytes() == data for name, data in kept.items())  # the finished erasure was not made again
    timing = {"seconds", "cpu_seconds", "erase_seconds", "erase_cpu_seconds"}

    def rows(folder):
        return [{k: v for k, v in row.items() if k not in timing} for row in json.loads((folder / "results.json").read_text())["rows"]]

    ours, theirs = rows(out), rows(reference)
    for a, b in zip(ours, theirs):
        for key in ("erased_accuracy", "other_accuracy", "held_out_accuracy"):
            assert a[key] == b[key], (a["method"], a["concept"], key)
        assert a["attacks"].keys() == b["attacks"].keys()
        for name in a["attacks"]:
            assert a["attacks"][name]["success_rate"] == b["attacks"][name]["success_rate"]
    assert len(ours) == len(theirs) == 4
