"""Every attack, with each judge given on the command line, on a tiny SD and a tiny SDXL folder: the run completes,
its result carries the judge's record, and the classifier judge's verdict is the one its weights force."""

from __future__ import annotations

import json

import pytest

import erasekit
from conftest import build_tiny_clip
from erasekit.cli import main
from test_judges import build_classifier

# the smallest budget of each attack (keys it does not have are refused, so each gets its own)
BUDGETS = {
    "paraphrase": [],
    "closed-form": [],
    "soft-prompt": ["steps=2", "tokens=2", "timesteps=1"],
    "unlearndiff": ["steps=2", "tokens=2", "timesteps=1"],
    "p4d": ["steps=2", "tokens=2", "check_every=0"],
    "ring-a-bell": ["population=4", "generations=2", "tokens=3"],
    "textual-inversion": ["steps=2", "images=1", "batch_size=1", "gradient_accumulation=1"],
}


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    (root / "alternatives.txt").write_text("dog\nbird\n")
    return {"classifier": [f"classifier:{build_classifier(root / 'resnet')}", "--judge-label", "tabby cat"],
            "clip": [f"clip:{build_tiny_clip(root)}", "--judge-alternatives", str(root / "alternatives.txt")]}


@pytest.fixture(scope="module")
def erasures(tiny_sd_folder, tiny_sdxl_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("erasures")
    paths = {}
    for name, folder in (("sd", tiny_sd_folder), ("sdxl", tiny_sdxl_folder)):
        model = erasekit.load_model(folder)
        paths[name] = (folder, erasekit.erase(model, "uce", ["cat"], kind="object", progress=False).save(root / f"{name}.safetensors"))
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    return paths, prompts


@pytest.mark.parametrize("judge", ["classifier", "clip"])
@pytest.mark.parametrize("attack", list(BUDGETS))
@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_every_attack_with_each_judge_from_the_cli(model, attack, judge, judges, erasures, tmp_path):
    (folder, erasure), prompts = erasures[0][model], erasures[1]
    out = tmp_path / "attack"
    argv = ["attack", "--model", str(folder), "--erasure", str(erasure), "--concept", "cat", "--kind", "object", "--attack", attack,
            "--prompts", str(prompts), "--out", str(out), "--judge", *judges[judge],
            "--budget", "prompts=1", "samples=2", "inference_steps=2", *BUDGETS[attack]]
    assert main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["complete"] and result["n"] == 2 and result["attack"] == attack
    low, high = result["success_rate_ci95"]
    assert low <= result["success_rate"] <= high
    if judge == "classifier":
        assert result["judge"]["protocol"]["name"] == "classifier-top1"
        assert result["success_rate"] == 1.0  # its weights make "tabby" win on every image
    else:
        assert result["judge"]["protocol"]["name"] == "clip-zero-shot"
