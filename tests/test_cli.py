"""The command line: --help everywhere, one-line errors with status 2, resumable generation."""

import subprocess
import sys

import pytest
import torch
from diffusers import UNet2DConditionModel

from erasekit.cli import main
from conftest import cli_error as _error
from erasekit.erasure import Erasure
from erasekit.models.loading import load_model
from erasekit.models.toy import toy_unet_config, write_toy_folder


def _random_toy(folder, seed):
    torch.manual_seed(seed)
    write_toy_folder(folder, UNet2DConditionModel(**toy_unet_config()), {"steps": 3})
    return folder


@pytest.fixture(scope="module")
def toy_a(tmp_path_factory):
    return _random_toy(tmp_path_factory.mktemp("toy_a"), 0)


@pytest.fixture(scope="module")
def toy_b(tmp_path_factory):
    return _random_toy(tmp_path_factory.mktemp("toy_b"), 1)


@pytest.fixture(scope="module")
def erasure_for_a(toy_a, tmp_path_factory):
    model = load_model(toy_a)
    name = next(iter(model.key_value_projections())) + ".weight"
    erasure = Erasure.from_deltas(model, "uce", ["triangle"], {}, {name: torch.full_like(dict(model.unet.named_parameters())[name], 0.01)})
    return erasure.save(tmp_path_factory.mktemp("erasures") / "a.safetensors")


@pytest.mark.parametrize("command", [[], ["erase"], ["generate"], ["evaluate"], ["attack"], ["bench"], ["demo"], ["toy"], ["toy", "eval"], ["toy", "grid"], ["toy", "train"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: erasekit" in capsys.readouterr().out


def test_unknown_method(capsys, toy_a):
    err = _error(capsys, ["erase", "--model", str(toy_a), "--method", "magic", "--concept", "x", "--out", "x.safetensors"])
    assert "unknown method 'magic'" in err and "uce" in err


def test_missing_model_folder(capsys, tmp_path):
    err = _error(capsys, ["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "a box", "--out", str(tmp_path / "o")])
    assert "does not exist" in err and "nowhere" in err


def test_unreadable_erasure_file(capsys, tmp_path, toy_a):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    err = _error(capsys, ["generate", "--model", str(toy_a), "--erasure", str(garbage), "--prompt", "a box", "--out", str(tmp_path / "o")])
    assert "garbage.safetensors" in err


def test_missing_erasure_file(capsys, tmp_path, toy_a):
    err = _error(capsys, ["generate", "--model", str(toy_a), "--erasure", str(tmp_path / "none.safetensors"), "--prompt", "a box", "--out", str(tmp_path / "o")])
    assert "does not exist" in err


def test_erasure_for_another_model(capsys, tmp_path, toy_b, erasure_for_a):
    err = _error(capsys, ["generate", "--model", str(toy_b), "--erasure", str(erasure_for_a), "--prompt", "a box", "--out", str(tmp_path / "o")])
    assert "made for" in err and "--force" in err
    assert main(["generate", "--model", str(toy_b), "--erasure", str(erasure_for_a), "--force", "--prompt", "a box", "--out", str(tmp_path / "o")]) == 0


def test_unknown_set_key(capsys, toy_a, tmp_path):
    err = _error(capsys, ["erase", "--model", str(toy_a), "--method", "uce", "--concept", "box", "--set", "no_such_knob=1", "--out", str(tmp_path / "e.safetensors")])
    assert "no_such_knob" in err and "valid keys" in err


def test_bad_set_value(capsys, toy_a, tmp_path):
    err = _error(capsys, ["erase", "--model", str(toy_a), "--method", "uce", "--concept", "box", "--set", "erase_scale=lots", "--out", str(tmp_path / "e.safetensors")])
    assert "erase_scale" in err


def test_unsupported_architecture(capsys, tmp_path):
    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    err = _error(capsys, ["generate", "--model", str(folder), "--prompt", "a box", "--out", str(tmp_path / "o")])
    assert "StableDiffusion3Pipeline" in err and "supported" in err


def test_generate_writes_images_and_resumes(tmp_path, toy_a, capsys):
    out = tmp_path / "images"
    argv = ["generate", "--model", str(toy_a), "--prompt", "a red box", "--prompt", "a blue disk", "--samples-per-prompt", "2", "--out", str(out), "--steps", "3"]
    assert main(argv) == 0
    assert "4 new images" in capsys.readouterr().out
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["00000_0.png", "00000_1.png", "00001_0.png", "00001_1.png"]
    (out / "00001_1.png").unlink()
    assert main(argv) == 0
    assert "1 new images" in capsys.readouterr().out
    assert not list(out.glob(".*tmp*"))


def test_entry_point_exits_with_status_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "erasekit.cli", "erase", "--method", "nope", "--concept", "x", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("erasekit: error: unknown method")


# ---------------------------------------------------------------- silent wrong results, refused early
def test_erase_out_without_suffix_does_not_overwrite_the_file_it_would_write(tmp_path, capsys):
    existing = tmp_path / "tri.safetensors"
    existing.write_bytes(b"keep me")
    assert main(["erase", "--model", "toy", "--method", "uce", "--concept", "triangle", "--out", str(tmp_path / "tri")]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_bytes() == b"keep me"


def test_erase_refuses_an_unwritable_out_before_training(tmp_path, capsys, monkeypatch):
    import erasekit.resolve

    monkeypatch.setattr(erasekit.resolve, "erase", lambda *a, **k: pytest.fail("trained before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["erase", "--model", "toy", "--method", "esd", "--concept", "triangle", "--out", str(blocker / "sub" / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0]


def test_non_finite_guidance_is_refused(tmp_path, capsys):
    for value in ("nan", "inf", "-1e309"):
        with pytest.raises(SystemExit) as stop:
            main(["generate", "--model", "toy", "--prompt", "a red triangle", f"--guidance={value}", "--out", str(tmp_path / "g")])
        assert stop.value.code == 2 and "finite" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_an_erasure_is_applied_once_and_a_damaged_one_is_refused(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    import erasekit

    model = erasekit.load_model("toy")
    erasure = erasekit.erase(model, "uce", ["triangle"], progress=False)
    path = erasure.save(tmp_path / "e.safetensors")
    first, again = erasekit.Erasure.load(path), erasekit.Erasure.load(path)
    first.apply(model)
    try:
        with pytest.raises(erasekit.ErasekitError, match="already applied"):
            again.apply(model)  # the same file twice would add its deltas twice
    finally:
        first.remove(model)
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for bad in (float("nan"), float("inf")):
        name = next(iter(tensors))
        broken = dict(tensors, **{name: torch.full_like(tensors[name], bad)})
        save_file(broken, tmp_path / "bad.safetensors", metadata=header)
        with pytest.raises(erasekit.ErasekitError, match="not finite"):
            erasekit.Erasure.load(tmp_path / "bad.safetensors")
    save_file(tensors, tmp_path / "meta.safetensors", metadata={"erasekit": "[1, 2]"})
    with pytest.raises(erasekit.ErasekitError, match="cannot read"):
        erasekit.Erasure.load(tmp_path / "meta.safetensors")


def test_generate_keys_each_image_on_everything_that_makes_it(tmp_path, toy_a, erasure_for_a, capsys):
    out = tmp_path / "images"
    base = ["generate", "--model", str(toy_a), "--prompt", "a red box", "--out", str(out), "--steps", "3"]
    assert main(base) == 0 and "1 new images" in capsys.readouterr().out
    image = (out / "00000_0.png").read_bytes()
    metadata = (out / "metadata.jsonl").read_text()
    assert '"key"' in metadata
    assert main(base) == 0 and "0 new images" in capsys.readouterr().out  # the same settings: nothing to do

    # other settings into the same folder are refused, and nothing there changes
    for extra in (["--erasure", str(erasure_for_a)], ["--guidance", "4"], ["--seed", "9"]):
        err = _error(capsys, base + extra)
        assert "other settings" in err and "--overwrite" in err
    err = _error(capsys, ["generate", "--model", str(toy_a), "--prompt", "a blue disk", "--out", str(out), "--steps", "3"])
    assert "other settings" in err
    err = _error(capsys, base[:-2] + ["--steps", "4"])
    assert "other settings" in err
    assert (out / "00000_0.png").read_bytes() == image and (out / "metadata.jsonl").read_text() == metadata

    # --overwrite makes the image again with the erasure; the record names the new settings
    assert main(base + ["--erasure", str(erasure_for_a), "--overwrite"]) == 0 and "1 new images" in capsys.readouterr().out
    assert (out / "metadata.jsonl").read_text() != metadata
    assert main(base + ["--erasure", str(erasure_for_a)]) == 0 and "0 new images" in capsys.readouterr().out

    # an unreadable image is made again, not counted as done
    (out / "00000_0.png").write_bytes(b"not a png")
    assert main(base + ["--erasure", str(erasure_for_a)]) == 0 and "1 new images" in capsys.readouterr().out


def test_generate_refuses_images_it_did_not_make(tmp_path, toy_a, capsys):
    out = tmp_path / "images"
    out.mkdir()
    (out / "00000_0.png").write_bytes(b"someone else's")
    err = _error(capsys, ["generate", "--model", str(toy_a), "--prompt", "a red box", "--out", str(out), "--steps", "3"])
    assert "metadata.jsonl" in err and (out / "00000_0.png").read_bytes() == b"someone else's"


@pytest.mark.parametrize("flag", ["--steps=0", "--batch-size=0", "--samples-per-prompt=-1", "--steps=1e9", "--seed=-3",
                                  "--seed=99999999999", "--steps=two"])
def test_counts_and_seeds_are_checked_before_any_work(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--model", "toy", "--prompt", "a red box", flag, "--out", str(tmp_path / "g")])
    assert stop.value.code == 2 and flag.split("=")[0] in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("device, words", [("foo", "unknown device"), ("cuda:7", "GPU"), ("xla", "unsupported device")])
def test_a_device_this_machine_lacks_is_one_line(device, words, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    err = _error(capsys, ["generate", "--model", "toy", "--device", device, "--prompt", "a red box", "--out", str(tmp_path / "g")])
    assert words in err and not (tmp_path / "g").exists()


@pytest.mark.parametrize("sets, words", [([], "nothing was saved"), (["--set", "checkpoint_dir=CK"], "resume=true")])
def test_ctrl_c_on_erase_says_whether_a_rerun_resumes(sets, words, tmp_path, capsys, monkeypatch):
    import erasekit.resolve

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(erasekit.resolve, "erase", interrupted)
    sets = [s.replace("CK", str(tmp_path / "ck")) for s in sets]
    assert main(["erase", "--model", "toy", "--method", "esd", "--concept", "triangle", *sets, "--out", str(tmp_path / "e")]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
