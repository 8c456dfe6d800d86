"""Judges on real models: ``classifier:PATH`` and ``clip:PATH`` from tiny local folders, their protocols,
the Wilson interval, ``erasekit attack --judge`` and ``erasekit evaluate`` with a judge.

The classifier is a tiny ResNet whose last layer is set by hand (zero weights, a bias), so which
class wins is known; the CLIP is tiny and random, and every verdict is checked against the
probabilities computed here from its two towers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_tiny_clip, cli_error
import erasekit
from erasekit.cli import main
from erasekit.errors import ErasekitError
from erasekit.eval.generate import PromptJob, write_metadata
from erasekit.eval.judges import (
    ClassifierJudge, ClipJudge, NudeNetJudge, ToyJudge, class_indices, concept_named_in, evaluate_judge_folder, judge_record, make_judge,
)
from erasekit.eval.protocols import IMAGENETTE_CLASSES, PROTOCOLS, get_protocol
from erasekit.eval.stats import rate_record, wilson_interval

LABELS = {0: "tench, Tinca tinca", 1: "tabby, tabby cat", 2: "church, church building", 3: "parachute, chute"}
BIAS = [0.0, 6.0, 3.0, 0.0]  # tabby wins by far, church is second, tench and parachute tie last


def build_classifier(folder: Path, bias=BIAS) -> Path:
    """A tiny ResNet image classifier whose prediction is its last bias (the weights before it are zeroed)."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          id2label=dict(LABELS), label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(0)
    model = ResNetForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier[1].weight.zero_()
        model.classifier[1].bias.copy_(torch.tensor(bias))
    model.save_pretrained(folder, safe_serialization=True)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory) -> Path:
    return build_classifier(tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny CLIPModel (random towers, logit scale 20) with its processor; the conftest vocabulary."""
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), logit_scale=20.0)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _image_folder(folder: Path, images: torch.Tensor, prompts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [PromptJob(i, 0, p, i) for i, p in enumerate(prompts)]
    for job, array in zip(jobs, (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)):
        Image.fromarray(array).save(folder / job.filename)
    write_metadata(jobs, folder)
    return folder


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any weights are loaded (the checks must come first)."""
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForImageClassification, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", forbidden)
    monkeypatch.setattr(erasekit.models.loading, "load_model", forbidden)


# ------------------------------------------------------------------------------------ statistics
def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # not empty at p = 0
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) is None
    wide, narrow = wilson_interval(5, 10), wilson_interval(500, 1000)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 5  # shrinks like 1/sqrt(n)
    assert rate_record(3, 4) == {"rate": 0.75, "shown": 3, "n": 4, "ci95": [pytest.approx(0.3006, abs=1e-4), pytest.approx(0.9544, abs=1e-4)]}


# ------------------------------------------------------------------------------------ protocols
def test_judge_protocols_are_registered():
    imagenette = get_protocol("imagenette-top1")
    assert imagenette.top_k == 1 and imagenette.classes == IMAGENETTE_CLASSES and len(IMAGENETTE_CLASSES) == 10
    assert imagenette.images_per_class == 500 and imagenette.guidance == 7.5
    assert get_protocol("classifier-top1").classes == ()
    clip = get_protocol("clip-zero-shot")
    assert clip.threshold is None and set(clip.alternatives) == {"object", "artist", "person"}
    for name in ("imagenette-top1", "classifier-top1", "clip-zero-shot"):
        record = PROTOCOLS[name].record()
        assert record["name"] == name and record["version"] == "1"
        json.dumps(record)  # JSON-able


def test_evaluate_list_shows_the_judge_protocols(capsys):
    assert main(["evaluate", "--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("imagenette-top1", "classifier-top1", "clip-zero-shot", "nudenet", "toy"):
        assert name in listing
    assert "recommended_backbone = openai/clip-vit-large-patch14" in listing


# ------------------------------------------------------------------------------------ the classifier judge
def test_class_names_and_prompts():
    assert class_indices(LABELS, "tench") == [0]  # one of a label's comma-separated names
    assert class_indices(LABELS, "Tabby Cat") == [1]
    assert class_indices(LABELS, "church, church building") == [2]  # the label as written
    assert class_indices(LABELS, "3") == [3] and class_indices(LABELS, 3) == [3]
    assert class_indices(LABELS, "cat") == [] and class_indices(LABELS, "9") == []
    assert concept_named_in("a photo of a golf ball on grass", IMAGENETTE_CLASSES) == "golf ball"
    assert concept_named_in("A Gas Pump at night", IMAGENETTE_CLASSES) == "gas pump"
    assert concept_named_in("a churchyard", IMAGENETTE_CLASSES) is None  # whole words only
    assert concept_named_in("a garbage truck", ["truck", "garbage truck"]) == "garbage truck"  # the longest


def test_classifier_judge_top_k_and_labels(classifier_folder):
    images = _images(3)
    judge = make_judge(f"classifier:{classifier_folder}", concept="tabby cat")
    assert isinstance(judge, ClassifierJudge) and judge.top_k == 1
    assert judge(images, "tabby cat") == [True] * 3
    assert judge(images, "church") == [False] * 3  # second, not top-1
    assert judge(images, "tench") == [False] * 3
    top2 = make_judge(f"classifier:{classifier_folder}", concept="church", top_k=2)
    assert top2(images, "church") == [True] * 3 and top2(images, "parachute") == [False] * 3
    # the probabilities are the model's on the processor's input, not a shortcut
    probabilities = judge.probabilities(images)
    assert probabilities.shape == (3, 4) and torch.allclose(probabilities.sum(-1), torch.ones(3))
    assert probabilities[0].tolist() == pytest.approx(torch.tensor(BIAS).softmax(-1).tolist(), abs=1e-5)
    entry = judge.assess(images[:1], "tabby cat")[0]
    assert entry["shown"] and entry["top"][0][0] == "tabby, tabby cat"
    # --judge-label: "cat" is no label, so it has to be said which class is the cat
    labelled = make_judge(f"classifier:{classifier_folder}", concept="cat", label="tabby cat")
    assert labelled(images, "cat") == [True] * 3
    assert make_judge(f"classifier:{classifier_folder}", concept="cat", label=0)(images, "cat") == [False] * 3
    record = labelled.record("cat")
    assert record["labels"] == [[1, "tabby, tabby cat"]] and record["top_k"] == 1
    assert record["protocol"]["name"] == "classifier-top1"  # cat is no Imagenette class
    assert judge.record("tabby cat")["protocol"]["name"] == "classifier-top1"
    assert make_judge(f"classifier:{classifier_folder}", concept="tench").record("tench")["protocol"]["name"] == "imagenette-top1"
    json.dumps(record)


def test_classifier_judge_refusals_come_before_any_weights(classifier_folder, tmp_path, no_weights):
    with pytest.raises(ErasekitError, match=r"'cat' is not a class of the classifier.*--judge-label.*tabby, tabby cat"):
        make_judge(f"classifier:{classifier_folder}", concept="cat")
    with pytest.raises(ErasekitError, match=r"'dog' is not a class"):
        make_judge(f"classifier:{classifier_folder}", concept="cat", label="dog")
    with pytest.raises(ErasekitError, match="does not exist"):
        make_judge(f"classifier:{tmp_path / 'nope'}", concept="tench")
    with pytest.raises(ErasekitError, match="needs a folder"):
        make_judge("classifier:", concept="tench")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((classifier_folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ErasekitError, match=r"no \.safetensors weights \(it holds pytorch_model\.bin\).*safe_serialization=True"):
        make_judge(f"classifier:{pickled}", concept="tench")
    with pytest.raises(ErasekitError, match="--judge-threshold does not apply to the classifier judge"):
        make_judge(f"classifier:{classifier_folder}", concept="tench", threshold=0.5)
    with pytest.raises(ErasekitError, match="top-k 9 is out of range"):
        make_judge(f"classifier:{classifier_folder}", concept="tench", top_k=9)
    with pytest.raises(ErasekitError, match="unknown judge 'resnet'"):
        make_judge("resnet", concept="tench")
    with pytest.raises(ErasekitError, match="not an image classifier"):
        config = json.loads((classifier_folder / "config.json").read_text())
        other = tmp_path / "other"
        other.mkdir()
        (other / "config.json").write_text(json.dumps({**config, "architectures": ["ResNetModel"]}))
        (other / "model.safetensors").write_bytes(b"")
        make_judge(f"classifier:{other}", concept="tench")
    with pytest.raises(ErasekitError, match="no built-in judge for 'cat'.*--judge classifier:PATH"):
        make_judge(None, concept="cat")
    assert isinstance(make_judge(None, concept="nudity"), NudeNetJudge)
    nudenet = make_judge("nudenet-0.45", concept="nudity")
    assert nudenet.threshold == 0.45 and nudenet.record()["protocol"]["name"] == "nudenet-0.45"
    assert make_judge("nudenet", threshold=0.5).record()["protocol"]["threshold"] == 0.5
    with pytest.raises(ErasekitError, match="--judge-label does not apply to the NudeNet judge"):
        make_judge("nudenet", concept="nudity", label="x")
    assert isinstance(make_judge("toy", concept="triangle"), ToyJudge)
    with pytest.raises(ErasekitError, match="not a toy-world concept"):
        make_judge("toy", concept="banana")


# ------------------------------------------------------------------------------------ the CLIP judge
def _clip_probabilities(folder: Path, images, texts: list[str]) -> torch.Tensor:
    """softmax(logit_scale * cosine) computed here from the two towers."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    inputs = processor(text=texts, images=erasekit.models.handle.to_pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text = model.text_projection(model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output)
        image, text = torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1)
        return (model.logit_scale.exp() * image @ text.T).softmax(-1)


def test_clip_judge_argmax_and_threshold(clip_folder):
    names = ["triangle", "circle", "cat", "red"]
    images = _images(4, seed=1)
    expected = _clip_probabilities(clip_folder, images, [f"a photo of {n}" for n in names])
    winner = names[int(expected[0].argmax())]
    loser = names[int(expected[0].argmin())]
    assert expected[0].max() - expected[0].min() > 0.05  # the towers tell the names apart

    judge = make_judge(f"clip:{clip_folder}", concept=winner, alternatives=names)
    assert isinstance(judge, ClipJudge)
    for concept in names:  # every verdict: the concept has the highest probability among the four names
        verdicts = judge(images, concept)
        order = [names.index(concept)] + [i for i, n in enumerate(names) if n != concept]
        assert verdicts == [bool(row[order].argmax() == 0) for row in expected], concept
        probabilities = judge.probabilities(images, concept)
        assert torch.allclose(probabilities, expected[:, order], atol=1e-4)
    assert judge(images[:1], winner) == [True] and judge(images[:1], loser) == [False]

    # a threshold: the concept's probability at or above it, winning or not
    p_loser = float(expected[0, names.index(loser)])
    low = make_judge(f"clip:{clip_folder}", concept=loser, alternatives=names, threshold=p_loser / 2)
    assert low(images[:1], loser) == [True]
    p_winner = float(expected[0, names.index(winner)])
    high = make_judge(f"clip:{clip_folder}", concept=winner, alternatives=names, threshold=min(1.0, p_winner + 0.02))
    assert high(images[:1], winner) == [False]
    record = low.record(loser)
    assert record["threshold"] == pytest.approx(p_loser / 2) and record["protocol"]["threshold"] == pytest.approx(p_loser / 2)
    assert record["text"] == f"a photo of {loser}" and record["alternatives"]["entries"] == [f"a photo of {n}" for n in names if n != loser]
    json.dumps(record)


def test_clip_judge_bundled_alternatives_by_kind(clip_folder, tmp_path, no_weights):
    judge = make_judge(f"clip:{clip_folder}", concept="church")  # an Imagenette class: an object
    source, text, others = judge.texts_for("church")
    assert source == "imagenette" and text == "a photo of church" and len(others) == 9 and "a photo of church" not in others
    source, text, others = judge.texts_for("Vincent van Gogh")  # in the bundled artists list
    assert source == "artists" and text == "an artwork by Vincent van Gogh" and len(others) > 1000
    assert all("Vincent van Gogh" not in o for o in others)
    assert judge.texts_for("Tom Hanks")[0] == "people"
    assert make_judge(f"clip:{clip_folder}", concept="Zyx Qwerty", kind="artist").texts_for("Zyx Qwerty")[0] == "artists"
    record = judge.record("church")
    assert record["alternatives"]["count"] == 9 and record["protocol"]["name"] == "clip-zero-shot"
    with pytest.raises(ErasekitError, match="cannot tell what kind of concept 'Zyx Qwerty'.*--kind"):
        make_judge(f"clip:{clip_folder}", concept="Zyx Qwerty")
    with pytest.raises(ErasekitError, match="no bundled alternatives for nudity.*--judge nudenet"):
        make_judge(f"clip:{clip_folder}", concept="nudity")
    with pytest.raises(ErasekitError, match="neither a file nor a bundled list"):
        make_judge(f"clip:{clip_folder}", concept="church", alternatives="nope.txt")
    with pytest.raises(ErasekitError, match="threshold 1.5 is not a probability"):
        make_judge(f"clip:{clip_folder}", concept="church", threshold=1.5)
    with pytest.raises(ErasekitError, match="--judge-top-k does not apply to the CLIP judge"):
        make_judge(f"clip:{clip_folder}", concept="church", top_k=2)
    with pytest.raises(ErasekitError, match="protocol 'imagenette-top1' does not judge with CLIP"):
        make_judge(f"clip:{clip_folder}", concept="church", protocol="imagenette-top1")
    listed = tmp_path / "names.txt"
    listed.write_text("# mine\nchurch\ncircle\nred\n")
    assert make_judge(f"clip:{clip_folder}", concept="church", alternatives=str(listed)).texts_for("church")[2] == ["a photo of circle", "a photo of red"]


def test_judge_record_of_a_callable():
    def my_judge(images, concept):
        return [False] * len(images)

    assert judge_record(my_judge) == {"spec": "callable", "judge": f"{__name__}.test_judge_record_of_a_callable.<locals>.my_judge"}


# ------------------------------------------------------------------------------------ evaluate
def test_evaluate_folder_with_the_classifier(classifier_folder, tmp_path, capsys):
    prompts = ["an image of tench", "an image of church", "an image of church", "a parachute in the sky"]
    folder = _image_folder(tmp_path / "images", _images(4), prompts)
    judge = make_judge(f"classifier:{classifier_folder}", top_k=2)
    result = evaluate_judge_folder(folder, judge, progress=False)
    assert [e["concept"] for e in result["per_image"]] == ["tench", "church", "church", "parachute"]  # named by each prompt
    assert [e["shown"] for e in result["per_image"]] == [False, True, True, False]  # church is in the top-2
    assert (result["shown"], result["n"], result["rate"]) == (2, 4, 0.5)
    assert result["ci95"] == pytest.approx(list(wilson_interval(2, 4)), abs=1e-6)
    assert result["per_concept"]["church"]["rate"] == 1.0 and result["per_concept"]["church"]["n"] == 2
    assert result["per_concept"]["tench"]["judge"]["labels"] == [[0, "tench, Tinca tinca"]]

    out = tmp_path / "imagenette.json"
    argv = ["evaluate", "--protocol", "imagenette-top1", "--images", str(folder), "--judge", f"classifier:{classifier_folder}",
            "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "imagenette-top1 v1: 0/4 images show their concept (0.0%, 95% CI 0.0%-49.0%)" in printed  # top-1: tabby wins
    written = json.loads(out.read_text())
    assert written["protocol"] == get_protocol("imagenette-top1").record() and written["judge"]["spec"] == f"classifier:{classifier_folder}"
    assert written["n"] == 4 and written["per_concept"]["church"]["shown"] == 0
    # one --concept: every image is judged as that concept
    assert main([*argv, "--concept", "cat", "--judge-label", "tabby cat"]) == 0
    written = json.loads(out.read_text())
    assert written["shown"] == 4 and written["protocol"]["name"] == "imagenette-top1"
    assert written["per_concept"]["cat"]["judge"]["labels"] == [[1, "tabby, tabby cat"]]
    capsys.readouterr()
    # the protocol follows the judge when --protocol is left out
    assert main(["evaluate", "--images", str(folder), "--judge", f"classifier:{classifier_folder}", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["protocol"]["name"] == "imagenette-top1"


def test_evaluate_folder_with_clip(clip_folder, tmp_path, capsys):
    folder = _image_folder(tmp_path / "images", _images(3, seed=1), ["a triangle", "a circle", "a cat"])
    out = tmp_path / "clip.json"
    argv = ["evaluate", "--protocol", "clip-zero-shot", "--images", str(folder), "--judge", f"clip:{clip_folder}", "--json", str(out)]
    names = tmp_path / "names.txt"
    names.write_text("triangle\ncircle\ncat\nred\n")
    assert main([*argv, "--concept", "triangle", "--concept", "circle", "--concept", "cat", "--judge-alternatives", str(names)]) == 0
    result = json.loads(out.read_text())
    expected = _clip_probabilities(clip_folder, torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f"{i:05d}_0.png"),
                                                                                     dtype=np.float32) / 255).permute(2, 0, 1)
                                                              for i in range(3)]), [f"a photo of {n}" for n in ["triangle", "circle", "cat", "red"]])
    assert [e["shown"] for e in result["per_image"]] == [bool(expected[i].argmax() == i) for i in range(3)]
    assert result["protocol"]["name"] == "clip-zero-shot" and result["judge"]["alternatives"]["count"] == 4
    assert main([*argv, "--concept", "triangle", "--judge-alternatives", str(names), "--judge-threshold", "0.0001"]) == 0
    assert json.loads(out.read_text())["shown"] == 3  # every image gives triangle at least 0.01%
    capsys.readouterr()


def test_evaluate_refusals_are_one_line(classifier_folder, clip_folder, tmp_path, capsys, no_weights):
    folder = _image_folder(tmp_path / "images", _images(2), ["an image of tench", "a red thing"])
    out = str(tmp_path / "x.json")
    base = ["evaluate", "--images", str(folder), "--json", out]
    assert "add --judge classifier:PATH" in cli_error(capsys, [*base, "--protocol", "imagenette-top1"])
    assert "add --judge clip:PATH" in cli_error(capsys, [*base, "--protocol", "clip-zero-shot"])
    assert "does not go with --protocol nudenet" in cli_error(capsys, [*base, "--protocol", "nudenet", "--judge", f"classifier:{classifier_folder}"])
    assert "does not judge with a classifier" in cli_error(capsys, [*base, "--protocol", "clip-zero-shot", "--judge", f"classifier:{classifier_folder}"])
    assert "'dog' is not a class" in cli_error(capsys, [*base, "--protocol", "imagenette-top1", "--judge", f"classifier:{classifier_folder}",
                                                         "--concept", "dog"])
    assert "pass the concept too" in cli_error(capsys, [*base, "--judge", f"classifier:{classifier_folder}", "--judge-label", "1"])


@pytest.mark.parametrize("make", [False, True])
def test_evaluate_prompt_naming_no_class_is_refused(classifier_folder, tmp_path, make):
    folder = _image_folder(tmp_path / "images", _images(2), ["an image of tench", "a red thing"])
    judge = make_judge(f"classifier:{classifier_folder}")
    if make:
        with pytest.raises(ErasekitError, match=r"00001_0.png \('a red thing'\) names none of tench, English springer"):
            evaluate_judge_folder(folder, judge, progress=False)
    else:
        assert evaluate_judge_folder(folder, judge, ["tench"], progress=False)["n"] == 2


# ------------------------------------------------------------------------------------ attack --judge
def test_attack_without_a_judge_for_the_concept_is_refused_before_loading(tmp_path, tiny_sd_folder, capsys, no_weights):
    argv = ["attack", "--model", str(tiny_sd_folder), "--erasure", str(tmp_path / "cat.safetensors"), "--concept", "cat",
            "--attack", "paraphrase", "--out", str(tmp_path / "atk")]
    err = cli_error(capsys, argv)
    assert "no built-in judge for 'cat'" in err and "--judge classifier:PATH" in err and "--judge clip:PATH" in err
    assert "does not exist" in cli_error(capsys, [*argv, "--judge", f"classifier:{tmp_path / 'resnet'}"])
    assert "--judge-top-k does not apply to the toy judge" in cli_error(
        capsys, ["attack", "--model", "toy", "--erasure", "x", "--concept", "triangle", "--attack", "paraphrase",
                 "--out", str(tmp_path / "t"), "--judge-top-k", "2"])


def test_attack_on_sd_with_a_classifier_judge(tiny_sd_folder, classifier_folder, tmp_path, capsys):
    model = erasekit.load_model(tiny_sd_folder)
    erasure = erasekit.erase(model, "uce", ["cat"], kind="object", progress=False)
    erasure_path = erasure.save(tmp_path / "cat-uce.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na cat in the style of a painting\n")
    argv = ["attack", "--model", str(tiny_sd_folder), "--erasure", str(erasure_path), "--concept", "cat", "--attack", "paraphrase",
            "--prompts", str(prompts), "--budget", "samples=2", "inference_steps=2", "--judge", f"classifier:{classifier_folder}"]
    assert main([*argv, "--out", str(tmp_path / "tabby"), "--judge-label", "tabby cat"]) == 0
    assert "attack success rate: 100.0% of 4 images, 95% CI 51.0%-100.0%" in capsys.readouterr().out
    result = json.loads((tmp_path / "tabby" / "result.json").read_text())
    assert result["success_rate"] == 1.0 and result["n"] == 4 and result["success_rate_ci95"][0] == pytest.approx(0.5101, abs=1e-3)
    assert result["judge"]["labels"] == [[1, "tabby, tabby cat"]] and result["judge"]["protocol"]["name"] == "classifier-top1"
    assert main([*argv, "--out", str(tmp_path / "tench"), "--judge-label", "tench"]) == 0
    result = json.loads((tmp_path / "tench" / "result.json").read_text())
    assert result["success_rate"] == 0.0 and result["n"] == 4  # the same images; the judge sees no tench
    # a rerun with another judge into the same folder is refused, not mixed
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "tench"), "--judge-label", "tabby cat"]) == 2
    assert "judge differ" in capsys.readouterr().err.strip().splitlines()[-1]  # (after the model's loading bars)
    # in Python: a spec string works as judge=
    from erasekit.attacks import run_attack

    result = run_attack(model, [erasure], "church", attack="paraphrase", prompts=["a church"], judge=f"classifier:{classifier_folder}",
                        budget={"samples": 1, "inference_steps": 2}, progress=False)
    assert result["success_rate"] == 0.0 and result["judge"]["protocol"]["name"] == "imagenette-top1"
