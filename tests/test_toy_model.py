"""The bundled toy model: it loads as "toy", draws what it is asked, and `erasekit toy eval` reports it."""

import json

import pytest
import torch

import erasekit
from erasekit.cli import main
from conftest import assert_same_picture
from erasekit.toy import world
from erasekit.toy.classifier import load_classifier
from erasekit.toy.evaluate import all_combinations, evaluate_toy, held_out_prompts


@pytest.fixture(scope="module")
def toy():
    return erasekit.load_model("toy")


def test_bundled_toy_model_loads(toy):
    assert toy.kind == "toy" and toy.vae is None
    assert toy.resolution == world.IMAGE_SIZE
    assert len(toy.cross_attention_layers()) == 7
    assert toy.encode(["a red circle"]).hidden_states.shape == (1, toy.max_length, 384)


def test_toy_model_draws_the_requested_shapes_and_colors(toy):
    prompts = [world.canonical_prompt(s, c, "plain") for s, c in zip(world.SHAPES, world.COLOR_NAMES)]
    seeds = [11, 12, 13]
    images = toy.generate([p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds])
    predicted = load_classifier().predict(images)
    expected_shapes = [s for s in world.SHAPES for _ in seeds]
    expected_colors = [c for c in world.COLOR_NAMES for _ in seeds]
    shape_hits = sum(p == e for p, e in zip(predicted["shape"], expected_shapes))
    color_hits = sum(p == e for p, e in zip(predicted["color"], expected_colors))
    assert shape_hits >= 13, (shape_hits, predicted["shape"])  # chance is 3 of 18; the model is ~90% right overall
    assert color_hits >= 16, (color_hits, predicted["color"])


def test_same_seed_gives_the_same_image(toy):
    a = toy.generate(["a blue star"], [5])
    b = toy.generate(["a red box", "a blue star"], [9, 5])[1:]
    assert_same_picture(a, b)
    assert not torch.allclose(a, toy.generate(["a blue star"], [6]), atol=0.05)  # and another seed does not


def test_toy_eval_cli_writes_the_documented_json(tmp_path, capsys):
    csv_file = tmp_path / "prompts.csv"
    csv_file.write_text("prompt,shape,color,style\na red circle on a plain background,circle,red,plain\na disk,circle,,\n")
    out = tmp_path / "eval.json"
    assert main(["toy", "eval", "--prompts", str(csv_file), "--samples-per-prompt", "3", "--seed", "4", "--json", str(out)]) == 0
    assert "overall accuracy" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["model"] and result["erasures"] == [] and result["seed"] == 4
    assert set(result["overall"]) == {"shape", "color", "style"}
    first, second = result["prompts"]
    assert first["prompt"] == "a red circle on a plain background" and first["n"] == 3
    assert second["color"] is None and second["accuracy"]["color"] is None and second["accuracy"]["style"] is None
    for prompt in result["prompts"]:
        assert 0 <= prompt["accuracy"]["shape"] <= 1


@pytest.mark.slow
def test_toy_model_meets_the_bar(toy):
    """Over 288 images of every combination: shape >= 90%, color >= 90%, style >= 85%; held-out shape >= 60%."""
    result = evaluate_toy(toy, all_combinations(), samples_per_prompt=2, seed=0, progress=False)
    assert sum(p["n"] for p in result["prompts"]) >= 200
    overall = result["overall"]
    assert overall["shape"] >= 0.90 and overall["color"] >= 0.90 and overall["style"] >= 0.85, overall
    held = evaluate_toy(toy, held_out_prompts(per_word=4), samples_per_prompt=2, seed=0, progress=False)
    assert held["overall"]["shape"] >= 0.60, held["overall"]


def test_toy_training_without_a_concept_resumes_only_with_its_own_settings(tmp_path):
    from erasekit.errors import ErasekitError
    from erasekit.toy.train import ToyTrainConfig, excluded_concepts, train_toy_model

    config = ToyTrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=1, exclude="triangle, Red")
    assert excluded_concepts(config) == [("color", "red"), ("shape", "triangle")]
    folder = train_toy_model(tmp_path / "run", config, progress=False)
    meta = json.loads((folder / "erasekit_toy.json").read_text())
    assert meta["train_config"]["exclude"] == "triangle, Red" and meta["train_steps"] == 2
    state = (tmp_path / "run" / "checkpoint" / "state.json").read_text()
    with pytest.raises(ErasekitError, match="other settings.*exclude"):
        train_toy_model(tmp_path / "run", ToyTrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=1), resume=True)
    assert (tmp_path / "run" / "checkpoint" / "state.json").read_text() == state
    with pytest.raises(ErasekitError, match="already holds a training run; --resume"):  # never silently overwritten
        train_toy_model(tmp_path / "run", config, progress=False)
    assert (tmp_path / "run" / "checkpoint" / "state.json").read_text() == state
    # how often it checkpoints changes no weight, so a resume may change it
    same = ToyTrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=5, exclude="triangle, Red")
    assert train_toy_model(tmp_path / "run", same, resume=True, progress=False) == folder
