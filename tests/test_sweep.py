"""benchmarks/sweep_toy.py on a tiny budget: counts and intervals in every cell, resume, and a folder of other
settings refused; and the toy protocol's rates with their counts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sweep_toy  # noqa: E402

TINY = ["--methods", "uce", "--concepts", "red", "--samples", "1", "--prompts-per-concept", "3", "--prompts-per-other", "1",
        "--held-out-per-word", "1"]


def test_sweep_counts_resumes_and_refuses_other_settings(tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    assert sweep_toy.main(TINY + ["--out", str(out)]) == 0
    result = json.loads((out / "sweep.json").read_text())
    cells = {(c["method"], c["concept"]): c for c in result["cells"]}
    assert set(cells) == {("original", "red"), ("uce", "red")}
    for cell in cells.values():
        assert cell["erased"]["n"] == 3 and cell["other"]["n"] == 5  # 3 prompts naming red; 1 prompt for each other colour
        low, high = cell["erased"]["ci95"]
        assert low <= cell["erased"]["rate"] <= high
        assert set(cell["other_attributes"]) == {"shape", "style"}
    assert cells[("uce", "red")]["erased"]["shown"] < cells[("original", "red")]["erased"]["shown"]
    summary = result["summary"]["uce"]
    assert summary["concepts"] == 1 and summary["erased_mean"] == cells[("uce", "red")]["erased"]["rate"]
    table = (out / "sweep.md").read_text()
    assert "| uce |" in table and "/3)" in table

    # a rerun reuses every cell
    import erasekit

    monkeypatch.setattr(erasekit, "erase", lambda *a, **k: pytest.fail("remade a finished cell"))
    assert sweep_toy.main(TINY + ["--out", str(out)]) == 0
    assert json.loads((out / "sweep.json").read_text())["cells"] == result["cells"]
    # other settings into the same folder: refused, nothing changed
    capsys.readouterr()
    before = (out / "cells" / "uce-red.json").read_text()
    assert sweep_toy.main(TINY + ["--out", str(out), "--seed", "5"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (out / "cells" / "uce-red.json").read_text() == before
    # so is a cell whose concept the resolver now resolves otherwise (another guide), but not the unerased model's
    from erasekit.toy import targets

    monkeypatch.setattr(targets, "sibling", lambda attribute, value, kept: kept[0])  # green, not orange
    assert sweep_toy.main(TINY + ["--out", str(out)]) == 2
    assert "uce-red.json was made with other settings" in capsys.readouterr().err


def test_sweep_refuses_unknown_names_before_any_work(tmp_path, capsys):
    assert sweep_toy.main(["--methods", "nope", "--out", str(tmp_path / "s")]) == 2
    assert sweep_toy.main(["--concepts", "trianglee", "--out", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()


def test_robustness_benchmark_counts_every_attack_resumes_and_refuses_other_settings(tmp_path, capsys, monkeypatch):
    import robustness_toy

    tiny = {name: {**budget, "prompts": 1, "samples": 2} for name, budget in robustness_toy.ATTACK_BUDGETS.items()}
    for name, steps in (("soft-prompt", {"steps": 2, "timesteps": 1}), ("p4d", {"steps": 2}),
                        ("ring-a-bell", {"population": 4, "generations": 1}), ("textual-inversion", {"steps": 1, "images": 1})):
        tiny[name].update(steps)
    monkeypatch.setattr(robustness_toy, "ATTACK_BUDGETS", tiny)
    out = tmp_path / "robust"
    args = ["--variants", "uce", "--shapes", "triangle", "--samples", "1", "--prompts-per-concept", "2",
            "--prompts-per-other", "1", "--attack-seeds", "3", "--out", str(out)]
    assert robustness_toy.main(args) == 0
    result = json.loads((out / "robustness.json").read_text())
    cells = {(c["variant"], c["shape"]): c for c in result["cells"]}
    assert set(cells) == {("original", "triangle"), ("uce", "triangle")}
    for attack, record in cells[("uce", "triangle")]["attacks"].items():
        assert record["n"] == 2 and record["ci95"][0] <= record["rate"] <= record["ci95"][1], attack  # 1 prompt x 2 images
    summary = result["summary"]["uce"]
    assert summary["shapes"] == 1 and summary["erased_worst"][1] == "triangle"
    assert result["front"] == ["uce"] and (out / "front.svg").read_text().startswith("<svg")
    import erasekit

    monkeypatch.setattr(erasekit, "erase", lambda *a, **k: pytest.fail("remade a finished cell"))
    assert robustness_toy.main(args) == 0
    capsys.readouterr()
    before = (out / "cells" / "uce-triangle.json").read_text()
    assert robustness_toy.main(args + ["--attack-seeds", "4"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (out / "cells" / "uce-triangle.json").read_text() == before
    assert robustness_toy.main(["--variants", "magic", "--out", str(tmp_path / "r")]) == 2
    assert robustness_toy.main(["--shapes", "red", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_robustness_toy_measures_the_model_retrained_without_the_shape(tmp_path, monkeypatch):
    import robustness_toy

    tiny = {name: {**budget, "prompts": 1, "samples": 1} for name, budget in robustness_toy.ATTACK_BUDGETS.items()
            if name in ("soft-prompt", "paraphrase")}
    tiny["soft-prompt"].update(steps=1, timesteps=1)
    monkeypatch.setattr(robustness_toy, "ATTACK_BUDGETS", tiny)
    real = robustness_toy.ToyTrainConfig
    monkeypatch.setattr(robustness_toy, "ToyTrainConfig", lambda **kw: real(**{**kw, "steps": 2, "batch_size": 2, "warmup_steps": 1}))
    out = tmp_path / "robust"
    args = ["--variants", "retrained", "--shapes", "cross", "--samples", "1", "--prompts-per-concept", "1",
            "--prompts-per-other", "1", "--attack-seeds", "3", "--out", str(out)]
    assert robustness_toy.main(args) == 0
    meta = json.loads((out / "retrained" / "cross" / "model" / "erasekit_toy.json").read_text())
    assert meta["train_config"]["exclude"] == "cross" and meta["train_steps"] == 2
    result = json.loads((out / "robustness.json").read_text())
    assert {(c["variant"], c["shape"]) for c in result["cells"]} == {("original", "cross"), ("retrained", "cross")}
    assert result["front"] == [] and "retrained" in result["summary"]  # a reference, not a method on the front
    assert "retrained (reference)" in (out / "front.svg").read_text()
    monkeypatch.setattr(robustness_toy, "train_toy_model", lambda *a, **k: pytest.fail("retrained a finished model"))
    assert robustness_toy.main(args) == 0


def test_unconditional_toy_counts_the_shapes_each_model_draws_from_the_empty_prompt(tmp_path, capsys):
    import unconditional_toy

    import erasekit
    from erasekit.toy import world
    from erasekit.toy.train import ToyTrainConfig, train_toy_model

    model = erasekit.load_model("toy")
    erasure = erasekit.erase(model, "uce", ["star"], preset="toy", progress=False).save(tmp_path / "star.safetensors")
    assert unconditional_toy.main(["--shape", "star", "--samples", "3", "--erasures", str(erasure)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| toy")]
    assert [row.split(" | ")[0] for row in rows] == ["| toy", "| toy + uce erasure"]
    for row in rows:  # every image is read as exactly one shape, and the rate is the star's count of 3
        cells = row.strip("| ").split(" | ")
        counts = dict(zip(world.SHAPES, map(int, cells[2:])))
        assert sum(counts.values()) == 3 and cells[1].split("(")[1].startswith(f"{counts['star']}/3; ")
    # bad input: refused, before any image is drawn
    assert unconditional_toy.main(["--shape", "hexagon"]) == 2
    assert "unknown shape 'hexagon'" in capsys.readouterr().err
    other = train_toy_model(tmp_path / "other", ToyTrainConfig(steps=1, batch_size=2, warmup_steps=1), progress=False)
    assert unconditional_toy.main(["--shape", "star", "--models", str(other), "--erasures", str(erasure)]) == 2
    assert "unconditional_toy: error:" in capsys.readouterr().err


def test_robustness_summary_counts_a_drop_of_exactly_the_goal_and_keeps_partial_variants_off_the_front():
    import robustness_toy

    def cell(erased, other, soft):
        return {"erased": {"rate": erased / 32}, "other": {"rate": other / 80}, "toy_fid": 1.0, "seconds": 1.0,
                "attacks": {"soft-prompt": {"rate": soft / 32}}}

    cells = {("original", "circle"): cell(32, 75, 30), ("original", "star"): cell(32, 75, 30),
             ("a", "circle"): cell(0, 71, 3), ("a", "star"): cell(1, 75, 2),  # drop 75/80 - 71/80: exactly 5 points
             ("b", "circle"): cell(0, 75, 1)}  # better, but measured on one shape of two
    summary = robustness_toy.summarise(cells, ["a", "b"], ["circle", "star"])
    assert all(summary["a"]["meets"].values()), summary["a"]["meets"]
    assert summary["b"]["meets"] == {"erased": True, "soft-prompt": True, "other attacks": True, "locality drop": True,
                                     "every shape": False}
    assert robustness_toy.pareto(summary) == ["a"]
