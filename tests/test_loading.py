"""load_model's checks on diffusers folders: safetensors only, and a model_index.json it can trust."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from erasekit import ErasekitError, load_model
from conftest import cli_error

GARBAGE = b"not a pickle: unpickling this would fail with another error"


@pytest.fixture
def sd_copy(tiny_sd_folder, tmp_path):
    return shutil.copytree(tiny_sd_folder, tmp_path / "model")


def _export_error(capsys, folder, tmp_path) -> str:
    err = cli_error(capsys, ["export", "--model", str(folder), "--format", "diffusers", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    return err


def test_a_folder_of_pickled_bin_weights_is_refused_with_the_conversion(sd_copy, tmp_path, capsys):
    weights = sd_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    (sd_copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(GARBAGE)
    err = _export_error(capsys, sd_copy, tmp_path)
    assert "unet holds only pickled .bin weights" in err and "save_pretrained" in err


def test_safetensors_are_read_even_beside_bin_files(sd_copy, tiny_sd_folder):
    for name in ("unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin"):
        (sd_copy / name).write_bytes(GARBAGE)
    model, reference = load_model(sd_copy), load_model(tiny_sd_folder)
    state = reference.unet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.unet.state_dict().items())


def test_a_folder_without_weights_is_refused(sd_copy, tmp_path, capsys):
    (sd_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert "vae has no .safetensors weights" in _export_error(capsys, sd_copy, tmp_path)


@pytest.mark.parametrize("content, expected", [
    (b"{not json", "is not readable JSON"),
    (b"\xff\xfe\x00", "is not readable JSON"),
    (b"[1, 2]", "holds JSON list, not an object"),
    (b'{"_class_name": 3}', "_class_name is not a pipeline class name"),
])
def test_a_bad_model_index_is_one_line(sd_copy, tmp_path, capsys, content, expected):
    (sd_copy / "model_index.json").write_bytes(content)
    assert expected in _export_error(capsys, sd_copy, tmp_path)


def test_a_listed_component_without_its_folder_is_one_line(sd_copy, tmp_path, capsys):
    shutil.rmtree(sd_copy / "tokenizer")
    err = _export_error(capsys, sd_copy, tmp_path)
    assert "lists 'tokenizer' in model_index.json but has no tokenizer/ folder" in err


def test_single_file_options_are_refused_for_folders(tiny_sd_folder):
    with pytest.raises(ErasekitError, match="--model-type and --model-config are for single-file checkpoints"):
        load_model(tiny_sd_folder, model_type="sd1")
    index = json.loads((tiny_sd_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


def test_other_files_are_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ErasekitError, match="not a .safetensors checkpoint"):
        load_model(path)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x00" * 16)
    with pytest.raises(ErasekitError, match="not a readable safetensors file"):
        load_model(damaged)
