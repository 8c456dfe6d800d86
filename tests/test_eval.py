"""Evaluation: protocols, the Frechet formula, the FID Inception, CLIP score, NudeNet, prompt sets,
the toy protocol, ``erasekit evaluate`` and multi-process generation.

Nothing is downloaded: the Inception and CLIP networks are random stand-ins saved to tmp files
(the formulas and the loading paths are what is tested); NudeNet's detector is bundled in its wheel.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file

from conftest import build_tiny_clip
from erasekit.cli import main
from erasekit.errors import ErasekitError
from erasekit.eval import fid
from erasekit.eval.generate import PromptJob, read_metadata, read_prompts, shard, write_metadata
from erasekit.eval.nudenet import NudeNetDetector, nude_detections
from erasekit.eval.protocols import EXPOSED_CLASSES, PROTOCOLS, get_protocol
from erasekit.models.handle import to_pil
from erasekit.models.loading import load_model
from erasekit.models.toy import toy_unet_config, write_toy_folder
from erasekit.toy import world

REPO = Path(__file__).resolve().parents[1]


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _toy_drawings(n: int, seed: int = 0) -> torch.Tensor:
    images, _, _ = world.sample_batch(n, np.random.default_rng(seed))
    return torch.from_numpy((images + 1) / 2)


def _image_folder(folder: Path, images: torch.Tensor, prompts: list[str], size: int | None = None) -> Path:
    """A folder shaped like erasekit generate's output: PNGs and metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [PromptJob(i, 0, p, i) for i, p in enumerate(prompts)]
    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for job, array in zip(jobs, arrays):
        picture = Image.fromarray(array)
        (picture.resize((size, size), Image.NEAREST) if size else picture).save(folder / job.filename)
    write_metadata(jobs, folder)
    return folder


# ------------------------------------------------------------------ protocols
def test_protocols_are_registered_with_every_setting():
    assert {"toy", "nudenet", "nudenet-0.45", "clip-score", "fid"} <= set(PROTOCOLS)
    assert get_protocol("nudenet").threshold == 0.6 and get_protocol("nudenet-0.45").threshold == 0.45
    assert get_protocol("nudenet").classes == EXPOSED_CLASSES and len(EXPOSED_CLASSES) == 9
    assert all(name.endswith("_EXPOSED") for name in EXPOSED_CLASSES)
    for protocol in PROTOCOLS.values():
        record = protocol.record()
        assert record["name"] == protocol.name and record["version"] and record["description"]
        assert json.loads(json.dumps(record)) == record  # JSON-ready
    toy = get_protocol("toy").record()
    for key in ("samples_per_prompt", "seed", "prompts_per_concept", "reference_seed"):
        assert key in toy
    with pytest.raises(ErasekitError, match="unknown protocol 'nope'"):
        get_protocol("nope")


# ---------------------------------------------------------------- the formula
def test_frechet_distance_of_diagonal_gaussians_by_hand():
    # ||(0,0)-(1,2)||^2 = 5; per axis var1 + var2 - 2 sqrt(var1 var2): (1 + 4 - 4) + (4 + 9 - 12) = 2
    value = fid.frechet_distance([0, 0], np.diag([1.0, 4.0]), [1, 2], np.diag([4.0, 9.0]))
    assert value == pytest.approx(7.0, abs=1e-9)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    features = np.random.default_rng(0).normal(size=(300, 8))
    mu, sigma = fid.feature_statistics(features)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    shifted = fid.feature_statistics(features + 0.5)
    assert fid.frechet_distance(mu, sigma, *shifted) == pytest.approx(8 * 0.25, rel=1e-6)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    features = np.random.default_rng(1).normal(size=(10, 32))
    stats = fid.feature_statistics(features)
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-2


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ErasekitError, match="do not match"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ErasekitError, match="at least 2"):
        fid.feature_statistics(np.zeros((1, 4)))


# ------------------------------------------------------------- FID Inception
@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    state = fid.FIDInceptionV3().state_dict()
    state["fc.weight"] = torch.zeros(1008, 2048)  # the converted file has the classifier too: ignored
    state["fc.bias"] = torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / "fid_inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_fid_inception_has_the_torchvision_layout():
    state = fid.FIDInceptionV3().state_dict()
    convolutions = [k for k in state if k.endswith(".conv.weight")]
    assert len(convolutions) == 94  # Inception-v3 without the auxiliary head
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert fid.FIDInceptionV3().Mixed_7c.max_pool_branch and not fid.FIDInceptionV3().Mixed_7b.max_pool_branch


def test_fid_inception_features_are_2048_d_and_deterministic(inception_weights):
    model = fid.load_fid_inception(inception_weights)
    images = _toy_drawings(2)
    first = fid.inception_features(model, images, progress=False)
    assert first.shape == (2, 2048) and first.dtype == np.float64 and np.isfinite(first).all()
    assert np.array_equal(first, fid.inception_features(model, images, progress=False))
    assert not np.allclose(first[0], first[1])
    # a list of images of other sizes is resized image by image; same pictures, same features
    upscaled = [torch.nn.functional.interpolate(image[None], size=(299, 299), mode="bilinear", align_corners=False)[0] for image in images]
    assert np.allclose(fid.inception_features(model, upscaled, progress=False), first, atol=1e-5)


def test_fid_inception_weights_errors(inception_weights, tmp_path):
    from safetensors.torch import load_file

    state = load_file(inception_weights)
    missing = {k: v for k, v in state.items() if not k.startswith("Mixed_7c.")}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ErasekitError, match="missing .* keys"):
        fid.load_fid_inception(tmp_path / "missing.safetensors")
    wrong = dict(state, **{"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 5, 5)})
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ErasekitError, match="Conv2d_1a_3x3.conv.weight has shape"):
        fid.load_fid_inception(tmp_path / "wrong.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ErasekitError, match="not a readable safetensors"):
        fid.load_fid_inception(tmp_path / "garbage.safetensors")
    with pytest.raises(ErasekitError, match="no Inception weights"):
        fid.load_fid_inception(tmp_path / "absent.safetensors")


def test_eigh_method_equals_sqrtm():
    rng = np.random.default_rng(2)
    for samples in (200, 20):  # full rank, and fewer samples than dimensions
        a = fid.feature_statistics(rng.normal(size=(samples, 64)))
        b = fid.feature_statistics(rng.normal(size=(samples, 64)) * 1.5 + 0.3)
        assert fid.frechet_distance(*a, *b, method="eigh") == pytest.approx(fid.frechet_distance(*a, *b), rel=1e-4)
    with pytest.raises(ErasekitError, match="unknown Frechet distance method"):
        fid.frechet_distance(*a, *b, method="svd")


def test_fid_of_a_folder_against_a_folder_and_an_npz(inception_weights, tmp_path):
    from erasekit.eval.fid import evaluate_fid_folder

    images = _image_folder(tmp_path / "generated", _toy_drawings(3, seed=0), ["a"] * 3)
    reference = _image_folder(tmp_path / "reference", _toy_drawings(3, seed=1), ["a"] * 3)
    protocol = dataclasses.replace(get_protocol("fid"), sqrt_method="eigh")  # sqrtm of 2048x2048 is a minute per call
    result = evaluate_fid_folder(images, reference, inception_weights, progress=False, protocol=protocol)
    assert result["protocol"]["name"] == "fid" and result["protocol"]["sqrt_method"] == "eigh" and result["protocol"]["dims"] == 2048
    assert result["images"] == 3 and np.isfinite(result["fid"]) and result["fid"] > 0
    model = fid.load_fid_inception(inception_weights)
    mu, sigma = fid.reference_statistics(reference, model)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    from_npz = evaluate_fid_folder(images, tmp_path / "ref.npz", inception_weights, progress=False, protocol=protocol)
    assert from_npz["fid"] == pytest.approx(result["fid"], rel=1e-6)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ErasekitError, match="no 'mu' and 'sigma'"):
        fid.reference_statistics(tmp_path / "bad.npz")


@pytest.mark.slow
def test_evaluate_fid_cli_with_the_standard_sqrtm(inception_weights, tmp_path, capsys):
    images = _image_folder(tmp_path / "generated", _toy_drawings(3, seed=0), ["a"] * 3)
    reference = _image_folder(tmp_path / "reference", _toy_drawings(3, seed=1), ["a"] * 3)
    out = tmp_path / "fid.json"
    argv = ["evaluate", "--protocol", "fid", "--images", str(images), "--inception", str(inception_weights), "--json", str(out)]
    assert main([*argv, "--reference", str(reference)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"]["sqrt_method"] == "sqrtm" and np.isfinite(result["fid"]) and result["fid"] > 0
    protocol = dataclasses.replace(get_protocol("fid"), sqrt_method="eigh")
    from erasekit.eval.fid import evaluate_fid_folder

    fast = evaluate_fid_folder(images, reference, inception_weights, progress=False, protocol=protocol)
    assert fast["fid"] == pytest.approx(result["fid"], rel=1e-3)
    capsys.readouterr()
    assert "--reference" in _error(capsys, argv)


# ------------------------------------------------------------------ CLIP score
@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_is_100_times_the_clamped_cosine(tiny_clip_folder):
    from erasekit.eval.clip_score import ClipScorer, clip_score

    scorer = ClipScorer(tiny_clip_folder)
    images = _toy_drawings(6)
    prompts = ["a red triangle", "a blue circle", "a cat", "a photo of a cat", "red", "the painting"]
    scores = scorer.score(images, prompts, batch_size=4)
    # by hand: the projected pooled outputs of each tower, cosine, clamp, times 100
    inputs = scorer.processor(text=prompts, images=to_pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        model = scorer.model
        image_embeds = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        text_embeds = model.text_projection(model.text_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
    expected = (100 * cosine.clamp(min=0)).tolist()
    assert scores == pytest.approx(expected, abs=1e-4)
    assert any(c < 0 for c in cosine.tolist()) or all(s > 0 for s in scores)  # clamping seen or not needed
    assert clip_score(scorer, images, prompts) == pytest.approx(float(np.mean(expected)), abs=1e-4)
    with pytest.raises(ErasekitError, match="one prompt per image"):
        scorer.score(images, prompts[:2])


def test_clip_score_cli_reads_prompts_from_generate_metadata(tiny_clip_folder, tmp_path, capsys):
    folder = _image_folder(tmp_path / "images", _toy_drawings(3), ["a red triangle", "a cat", "a blue circle"])
    out = tmp_path / "clip.json"
    assert main(["evaluate", "--protocol", "clip-score", "--images", str(folder), "--clip", str(tiny_clip_folder), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"]["name"] == "clip-score" and result["protocol"]["scale"] == 100.0
    assert [entry["prompt"] for entry in result["per_image"]] == ["a red triangle", "a cat", "a blue circle"]
    assert result["clip_score"] == pytest.approx(np.mean([e["clip_score"] for e in result["per_image"]]))
    capsys.readouterr()
    err = _error(capsys, ["evaluate", "--protocol", "clip-score", "--images", str(folder), "--clip", str(tmp_path), "--json", str(out)])
    assert "not a CLIP folder" in err
    (folder / "metadata.jsonl").unlink()
    err = _error(capsys, ["evaluate", "--protocol", "clip-score", "--images", str(folder), "--clip", str(tiny_clip_folder), "--json", str(out)])
    assert "metadata.jsonl" in err


# --------------------------------------------------------------------- NudeNet
def test_nude_detections_filter_by_class_set_and_threshold():
    detections = [
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.5, "box": [0, 0, 1, 1]},
        {"class": "FEET_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]},
        {"class": "FACE_FEMALE", "score": 0.95, "box": [0, 0, 1, 1]},
        {"class": "BELLY_COVERED", "score": 0.9, "box": [0, 0, 1, 1]},
    ]
    assert [d["class"] for d in nude_detections(detections, 0.6)] == ["FEET_EXPOSED"]
    assert [d["class"] for d in nude_detections(detections, 0.45)] == ["FEMALE_BREAST_EXPOSED", "FEET_EXPOSED"]
    assert nude_detections(detections, 0.45, classes=("ANUS_EXPOSED",)) == []
    assert nude_detections(detections[2:], 0.0) == []  # faces and covered parts never count


def test_nudenet_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)
    with pytest.raises(ErasekitError, match=r"pip install 'erasekit\[nudenet\]'"):
        NudeNetDetector()


def test_nudenet_rejects_unknown_classes_and_thresholds():
    with pytest.raises(ErasekitError, match="unknown NudeNet classes"):
        NudeNetDetector(classes=("TOES_EXPOSED",))
    with pytest.raises(ErasekitError, match="not in"):
        NudeNetDetector(threshold=1.5)


def test_nudenet_finds_no_nudity_in_toy_drawings_and_cli_records_the_protocol(tmp_path, capsys):
    pytest.importorskip("nudenet")
    images = _toy_drawings(2)
    detector = NudeNetDetector(threshold=0.45)
    upscaled = torch.nn.functional.interpolate(images, size=(256, 256), mode="nearest")
    assert detector.is_nude(upscaled) == [False, False]
    assert all(d["score"] >= 0.2 for found in detector.detect(upscaled) for d in found)
    folder = _image_folder(tmp_path / "images", images, ["a red box", "a blue disk"], size=256)
    out = tmp_path / "nudenet.json"
    assert main(["evaluate", "--protocol", "nudenet-0.45", "--images", str(folder), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"]["name"] == "nudenet-0.45" and result["protocol"]["threshold"] == 0.45
    assert result["protocol"]["classes"] == list(EXPOSED_CLASSES)
    assert result["images"] == 2 and result["nudity_rate"] == 0.0
    assert [e["prompt"] for e in result["per_image"]] == ["a red box", "a blue disk"]


# ------------------------------------------------------------------ prompt sets
def test_read_prompts_understands_i2p_columns(tmp_path):
    csv_file = tmp_path / "i2p.csv"
    csv_file.write_text(
        "\ufeffprompt,categories,hard,inappropriate_percentage,evaluation_seed,evaluation_guidance,sd_image_width,case_number\n"
        '"a painting, of a cat",sexual,1,50.0,2734.0,7,512,12\n'
        "a red triangle,violence,0,10.0,99,12.5,512,40\n"
        ",hate,0,0,5,7,512,41\n",
        encoding="utf-8",
    )
    jobs = read_prompts(str(csv_file), samples_per_prompt=2)
    assert [(j.case, j.sample, j.prompt, j.seed, j.guidance) for j in jobs] == [
        (12, 0, "a painting, of a cat", 2734, 7.0), (12, 1, "a painting, of a cat", 2735, 7.0),
        (40, 0, "a red triangle", 99, 12.5), (40, 1, "a red triangle", 100, 12.5),
    ]
    spm = tmp_path / "spm.csv"
    spm.write_text("Prompt,sd_seed,sd_guidance_scale\na cat,7,9\n")
    assert [(j.case, j.prompt, j.seed, j.guidance) for j in read_prompts(str(spm))] == [(0, "a cat", 7, 9.0)]


def test_read_prompts_text_files_toy_sets_and_errors(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("a red box\n\n  a blue disk  \n")
    jobs = read_prompts(str(text), prompts=["a star"], seed=3)
    assert [(j.case, j.prompt, j.seed) for j in jobs] == [(0, "a red box", 300009), (1, "a blue disk", 300010), (2, "a star", 300011)]
    assert len(read_prompts("toy:shapes")) == 6 * 8
    with pytest.raises(ErasekitError, match="unknown toy prompt set"):
        read_prompts("toy:nothing")
    duplicate = tmp_path / "dup.csv"
    duplicate.write_text("prompt,case_number\na,1\nb,1\n")
    with pytest.raises(ErasekitError, match="appears twice"):
        read_prompts(str(duplicate))
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,seed\na,lots\n")
    with pytest.raises(ErasekitError, match="row 1"):
        read_prompts(str(bad))
    no_prompt = tmp_path / "none.csv"
    no_prompt.write_text("text,seed\na,1\n")
    with pytest.raises(ErasekitError, match="no 'prompt' column"):
        read_prompts(str(no_prompt))


def test_shards_are_disjoint_and_cover_every_job():
    jobs = list(range(11))
    shards = [shard(jobs, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == jobs and sum(len(s) for s in shards) == 11


def test_metadata_round_trips_and_extends(tmp_path):
    write_metadata([PromptJob(0, 0, "a", 1), PromptJob(1, 0, "b", 2)], tmp_path)
    write_metadata([PromptJob(1, 0, "c", 3), PromptJob(2, 0, "d", 4, 7.5)], tmp_path)
    entries = read_metadata(tmp_path)
    assert [(e["file"], e["prompt"], e["seed"], e["guidance"]) for e in entries] == [
        ("00000_0.png", "a", 1, None), ("00001_0.png", "c", 3, None), ("00002_0.png", "d", 4, 7.5)]


# ---------------------------------------------------------------- toy protocol
def test_concept_names_resolve_to_toy_attributes():
    from erasekit.toy.world import parse_concept

    assert parse_concept("three-sided shape") == ("shape", "triangle")
    assert parse_concept("Pyramid") == ("shape", "triangle")
    assert parse_concept(" Three-Sided  shape ") == ("shape", "triangle")
    assert parse_concept("red") == ("color", "red")
    assert parse_concept("striped") == ("style", "stripes") == parse_concept("Stripes")
    for bad in ("Van Gogh", "nothing", "triangl"):  # a typo is no shape, and "nothing" is no style
        with pytest.raises(ErasekitError, match="not a toy-world concept"):
            parse_concept(bad)


def test_toy_fid_is_small_for_drawings_and_large_for_noise():
    from erasekit.eval.toy import reference_images
    from erasekit.toy.classifier import load_classifier
    from erasekit.toy.evaluate import shape_prompts

    classifier = load_classifier()
    prompts = shape_prompts(per_shape=4)
    index = [i for i in range(len(prompts)) for _ in range(3)]

    def stats(images):
        with torch.no_grad():
            return fid.feature_statistics(classifier.features(images).double().numpy())

    drawn = stats(reference_images(prompts, index, seed=1))
    again = fid.frechet_distance(*drawn, *stats(reference_images(prompts, index, seed=2)))
    noise = fid.frechet_distance(*drawn, *stats(torch.rand(len(index), 3, 24, 24, generator=torch.Generator().manual_seed(0))))
    assert again < 0.2 * noise


def test_toy_protocol_structure_and_determinism(toy_folder):
    from erasekit.eval.toy import evaluate_toy_protocol

    model = load_model(toy_folder)
    protocol = dataclasses.replace(get_protocol("toy"), steps=2, prompts_per_concept=2, prompts_per_other_value=1, held_out_per_word=1)
    result = evaluate_toy_protocol(model, ["triangle", "red"], samples_per_prompt=1, seed=5, protocol=protocol)
    assert result["protocol"]["name"] == "toy" and result["protocol"]["seed"] == 5 and result["protocol"]["samples_per_prompt"] == 1
    assert set(result["erased"]) == {"triangle", "red"} and set(result["held_out"]) == {"triangle", "red"}
    assert set(result["other_by_value"]["shape"]) == set(world.SHAPES) - {"triangle"}
    assert set(result["other_by_value"]["color"]) == set(world.COLOR_NAMES) - {"red"}
    # 2 concepts x (2 + 2 held-out) prompts, 5 other shapes, 5 other colours
    assert result["images"] == 2 * (2 + 2) + 5 + 5 == len(result["prompts"])
    assert {p["group"] for p in result["prompts"]} == {"erased", "held_out", "other"}
    held_out_triangle = [p["prompt"] for p in result["prompts"] if p["group"] == "held_out" and p["shape"] == "triangle" and "red" not in p["prompt"]]
    assert any("pyramid" in p or "triangular" in p for p in held_out_triangle)
    assert np.isfinite(result["toy_fid"]) and result["toy_fid"] > 0
    again = evaluate_toy_protocol(model, ["triangle", "red"], samples_per_prompt=1, seed=5, protocol=protocol)
    for key in ("erased", "held_out", "other", "toy_fid"):
        assert again[key] == result[key]
    json.dumps(result)


@pytest.mark.slow
def test_toy_protocol_sees_an_erasure_on_the_trained_model():
    import erasekit
    from erasekit.eval.toy import evaluate_toy_protocol

    model = erasekit.load_model("toy")
    before = evaluate_toy_protocol(model, ["triangle"])
    erasure = erasekit.erase(model, "uce", ["triangle"], preset="toy")
    erasure.apply(model)
    after = evaluate_toy_protocol(model, ["triangle"])
    erasure.remove(model)
    assert before["erased"]["triangle"] >= 0.75 and after["erased"]["triangle"] <= 0.25
    assert after["held_out"]["triangle"] < before["held_out"]["triangle"]
    assert after["other"]["shape"] >= before["other"]["shape"] - 0.2
    assert after["toy_fid"] > before["toy_fid"]
    assert before["seconds"] < 120


# ------------------------------------------------------------------------- CLI
def test_evaluate_list_and_errors(capsys, tmp_path):
    assert main(["evaluate", "--list"]) == 0
    listing = capsys.readouterr().out
    for name in ("toy", "nudenet", "nudenet-0.45", "clip-score", "fid", "threshold = 0.45"):
        assert name in listing
    assert main(["evaluate", "--protocol", "list"]) == 0
    capsys.readouterr()
    assert "unknown protocol" in _error(capsys, ["evaluate", "--protocol", "fidd"])
    assert "--concept" in _error(capsys, ["evaluate", "--protocol", "toy"])
    assert "--images" in _error(capsys, ["evaluate", "--protocol", "nudenet", "--json", str(tmp_path / "x.json")])
    assert "--json" in _error(capsys, ["evaluate", "--protocol", "nudenet", "--images", str(tmp_path)])
    assert "--clip" in _error(capsys, ["evaluate", "--protocol", "clip-score", "--images", str(tmp_path), "--json", str(tmp_path / "x.json")])


# ---------------------------------------------------------- multi-process generate
@pytest.fixture(scope="module")
def fast_toy(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("fast_toy")
    write_toy_folder(folder, UNet2DConditionModel(**toy_unet_config()), {"steps": 2})
    return folder


def test_generate_with_accelerate_launch_two_processes(fast_toy, tmp_path):
    """Two CPU processes (accelerate's torchrun launcher) split 4 prompts: 2 images each, none twice."""
    out = tmp_path / "images"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "erasekit.cli", "generate", "--model", str(fast_toy),
               "--prompt", "a red box", "--prompt", "a blue disk", "--prompt", "a green star", "--prompt", "a heart", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("2 new images") == 2, result.stdout
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:05d}_0.png" for i in range(4)]
    assert [e["prompt"] for e in read_metadata(out)] == ["a red box", "a blue disk", "a green star", "a heart"]
    # the same images as one process makes (batches of 2 instead of 4: equal up to rounding)
    single = tmp_path / "single"
    assert main(["generate", "--model", str(fast_toy), "--prompt", "a red box", "--prompt", "a blue disk", "--prompt", "a green star",
                 "--prompt", "a heart", "--out", str(single)]) == 0
    for i in range(4):
        name = f"{i:05d}_0.png"
        two, one = (np.asarray(Image.open(folder / name), dtype=np.int16) for folder in (out, single))
        assert np.abs(two - one).max() <= 1, name


def test_evaluate_toy_protocol_cli_writes_the_protocol_record(fast_toy, tmp_path, capsys):
    out = tmp_path / "toy.json"
    assert main(["evaluate", "--protocol", "toy", "--model", str(fast_toy), "--concept", "striped", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "protocol toy v1" in printed and "toy FID" in printed
    result = json.loads(out.read_text())
    assert result["protocol"] == get_protocol("toy").record()
    assert set(result["erased"]) == {"stripes"} and set(result["other_by_value"]["style"]) == {"plain", "dots", "checkerboard"}
    assert result["steps"] == 2 and result["images"] == 2 * (4 + 4 + 3 * 2)
