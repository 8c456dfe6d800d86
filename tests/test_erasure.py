"""The Erasure artifact: save/load, apply/remove/merge, stacking, and the base-model check."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import erasekit.modules
from erasekit import Erasure, ErasekitError, apply_erasures, load_model, save_pipeline
from erasekit import erasure as erasure_module


@pytest.fixture
def sd_model(tiny_sd_folder):
    """A fresh tiny SD model per test: these tests change its weights."""
    return load_model(tiny_sd_folder)


def kv_names(model) -> list[str]:
    """Parameter names of every cross-attention to_k / to_v weight, in UNet order."""
    return [f"{name}.weight" for name in model.key_value_projections()]


def random_deltas(model, names, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    parameters = dict(model.unet.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(parameters[name].shape, generator=generator) for name in names}


@pytest.fixture
def two_erasures(sd_model):
    """A: to_k and to_v of the first two layers. B: every to_v. They overlap on the first two to_v."""
    names = kv_names(sd_model)
    first_two = names[:4]
    all_v = [n for n in names if n.endswith("to_v.weight")]
    a = Erasure.from_deltas(sd_model, "test", ["cat"], {"lr": 1e-5}, random_deltas(sd_model, first_two, 1), info={"epochs": 3})
    b = Erasure.from_deltas(sd_model, "test", ["red"], {}, random_deltas(sd_model, all_v, 2))
    overlap = set(a.deltas) & set(b.deltas)
    assert overlap and set(a.deltas) - overlap and set(b.deltas) - overlap
    return a, b


def unet_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.unet.named_parameters()}


def assert_state_equal(model, expected: dict[str, torch.Tensor]) -> None:
    for name, value in model.unet.named_parameters():
        assert torch.equal(value, expected[name]), name


# ------------------------------------------------------------------- creation
def test_from_deltas_records_the_base(sd_model, two_erasures):
    a, _ = two_erasures
    assert a.base_model == sd_model.name
    assert set(a.base_signature) == set(a.deltas)
    assert all(d.dtype == torch.float32 and d.device.type == "cpu" for d in a.deltas.values())
    assert a.num_parameters == sum(d.numel() for d in a.deltas.values())
    with pytest.raises(ErasekitError, match="no parameter"):
        Erasure.from_deltas(sd_model, "test", ["cat"], {}, {"not.a.parameter": torch.zeros(2)})


# ------------------------------------------------------------------ disk
def test_save_load_round_trip(tmp_path, two_erasures):
    a, _ = two_erasures
    path = a.save(tmp_path / "cat.safetensors")
    assert path == tmp_path / "cat.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["cat.safetensors"]  # one file, no temporary left
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["erasekit"])
        assert set(f.keys()) == {f"delta.{name}" for name in a.deltas}
    assert meta["format"] == erasure_module.FORMAT_VERSION and meta["method"] == "test"

    loaded = Erasure.load(path)
    assert loaded.metadata() == a.metadata()
    assert (loaded.method, loaded.concepts, loaded.config, loaded.info) == ("test", ["cat"], {"lr": 1e-5}, {"epochs": 3})
    assert loaded.base_signature == a.base_signature and loaded.fingerprint == a.fingerprint
    assert set(loaded.deltas) == set(a.deltas) and loaded.modules == {}
    for name, delta in a.deltas.items():
        assert torch.equal(loaded.deltas[name], delta)


def test_save_adds_the_suffix_and_overwrites(tmp_path, two_erasures):
    a, b = two_erasures
    assert a.save(tmp_path / "erasure") == tmp_path / "erasure.safetensors"
    b.save(tmp_path / "erasure.safetensors")  # replaces the file in one step
    assert [p.name for p in tmp_path.iterdir()] == ["erasure.safetensors"]
    assert Erasure.load(tmp_path / "erasure.safetensors").concepts == ["red"]


def test_loaded_erasure_applies_to_its_base(sd_model, tmp_path, two_erasures):
    a, _ = two_erasures
    before = unet_state(sd_model)
    loaded = Erasure.load(a.save(tmp_path / "a.safetensors"))
    loaded.apply(sd_model)  # the signature survives the JSON round trip
    for name, delta in a.deltas.items():
        torch.testing.assert_close(dict(sd_model.unet.named_parameters())[name], before[name] + delta)


def test_load_refuses_what_is_not_an_erasure(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ErasekitError, match="does not exist") as error:
        Erasure.load(missing)
    assert str(missing) in str(error.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 this is not a safetensors file" * 10)
    with pytest.raises(ErasekitError, match="not a readable safetensors"):
        Erasure.load(garbage)

    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3)}, plain, metadata={"format": "pt"})
    with pytest.raises(ErasekitError, match="without erasekit metadata"):
        Erasure.load(plain)

    future = tmp_path / "future.safetensors"
    save_file({"delta.x": torch.zeros(3)}, future, metadata={"erasekit": json.dumps({"format": 99})})
    with pytest.raises(ErasekitError, match="upgrade"):
        Erasure.load(future)

    with pytest.raises(ErasekitError):
        apply_erasures(None, [missing])


# ---------------------------------------------------------- apply / remove
def test_apply_adds_the_delta_and_remove_restores_exactly(sd_model, two_erasures):
    a, _ = two_erasures
    original = unet_state(sd_model)
    a.apply(sd_model)
    assert sd_model.applied_erasures == [(a, 1.0)]
    parameters = dict(sd_model.unet.named_parameters())
    for name, value in parameters.items():
        if name in a.deltas:
            torch.testing.assert_close(value, original[name] + a.deltas[name], rtol=0, atol=1e-7)
            assert not torch.equal(value, original[name])
        else:
            assert torch.equal(value, original[name]), name
    with pytest.raises(ErasekitError, match="already applied"):
        a.apply(sd_model)
    a.remove(sd_model)
    assert_state_equal(sd_model, original)
    assert sd_model.applied_erasures == [] and sd_model.original_parameters == {}
    with pytest.raises(ErasekitError, match="not applied"):
        a.remove(sd_model)


def test_apply_changes_what_the_model_predicts(sd_model, two_erasures):
    a, _ = two_erasures
    cond = sd_model.encode(["a cat"])
    x = torch.randn(sd_model.latent_shape(1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = sd_model.predict_noise(x, 500, cond)
        a.apply(sd_model)
        during = sd_model.predict_noise(x, 500, cond)
        a.remove(sd_model)
        after = sd_model.predict_noise(x, 500, cond)
    assert not torch.allclose(before, during, atol=1e-4)
    assert torch.equal(before, after)


@pytest.mark.parametrize("first_removed", ["a", "b"])
def test_stacked_erasures_come_off_exactly_in_any_order(sd_model, two_erasures, first_removed):
    a, b = two_erasures
    original = unet_state(sd_model)
    alone = {}
    for key, erasure in (("a", a), ("b", b)):
        erasure.apply(sd_model)
        alone[key] = unet_state(sd_model)
        erasure.remove(sd_model)
        assert_state_equal(sd_model, original)

    a.apply(sd_model)
    b.apply(sd_model)
    parameters = dict(sd_model.unet.named_parameters())
    for name in set(a.deltas) & set(b.deltas):
        torch.testing.assert_close(parameters[name], original[name] + a.deltas[name] + b.deltas[name])
    first, second, second_key = (a, b, "b") if first_removed == "a" else (b, a, "a")
    first.remove(sd_model)
    assert_state_equal(sd_model, alone[second_key])  # the other one alone, bit for bit
    assert sd_model.applied_erasures == [(second, 1.0)]
    assert set(sd_model.original_parameters) == set(second.deltas)
    second.remove(sd_model)
    assert_state_equal(sd_model, original)
    assert sd_model.applied_erasures == [] and sd_model.original_parameters == {}


def test_scale_half_adds_half_the_delta(sd_model, two_erasures):
    a, b = two_erasures
    original = unet_state(sd_model)
    a.apply(sd_model, scale=0.5)
    parameters = dict(sd_model.unet.named_parameters())
    for name, delta in a.deltas.items():
        torch.testing.assert_close(parameters[name], original[name] + 0.5 * delta, rtol=0, atol=1e-7)
        assert not torch.allclose(parameters[name], original[name] + delta, atol=1e-4)
    half_a = unet_state(sd_model)
    b.apply(sd_model)
    b.remove(sd_model)  # rebuilding the shared weights keeps A's scale
    assert_state_equal(sd_model, half_a)
    a.remove(sd_model)
    assert_state_equal(sd_model, original)


# ------------------------------------------------------------------ merge
def test_merge_changes_the_weights_for_good(sd_model, two_erasures):
    a, b = two_erasures
    original = unet_state(sd_model)
    a.merge(sd_model)
    merged = unet_state(sd_model)
    for name, delta in a.deltas.items():
        torch.testing.assert_close(merged[name], original[name] + delta, rtol=0, atol=1e-7)
    assert sd_model.applied_erasures == [] and sd_model.original_parameters == {}
    with pytest.raises(ErasekitError, match="not applied"):
        a.remove(sd_model)
    # B was made for the weights before the merge: they changed where A and B overlap
    with pytest.raises(ErasekitError, match="force"):
        b.apply(sd_model)
    b.apply(sd_model, force=True)
    b.remove(sd_model)
    assert_state_equal(sd_model, merged)  # removing B keeps what was merged


def test_merge_under_an_applied_erasure_keeps_it_removable(sd_model, two_erasures):
    a, b = two_erasures
    original = unet_state(sd_model)
    b.apply(sd_model)
    a.merge(sd_model)
    b.remove(sd_model)
    parameters = dict(sd_model.unet.named_parameters())
    for name, value in parameters.items():
        expected = original[name] + a.deltas[name] if name in a.deltas else original[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7)
    assert sd_model.original_parameters == {}


def test_merging_an_applied_erasure_is_refused(sd_model, two_erasures):
    a, _ = two_erasures
    a.apply(sd_model)
    applied = unet_state(sd_model)
    with pytest.raises(ErasekitError, match="remove it"):
        a.merge(sd_model)
    assert_state_equal(sd_model, applied)


# ------------------------------------------------------------ base model check
def test_erasure_for_another_base_model_is_refused(tiny_sd_other_folder, two_erasures):
    a, _ = two_erasures
    other = load_model(tiny_sd_other_folder)
    original = unet_state(other)
    with pytest.raises(ErasekitError, match="force=True"):
        a.apply(other)
    with pytest.raises(ErasekitError, match="force=True"):
        a.merge(other)
    assert_state_equal(other, original)
    assert other.applied_erasures == [] and other.original_parameters == {}

    a.apply(other, force=True)
    parameters = dict(other.unet.named_parameters())
    for name, delta in a.deltas.items():
        torch.testing.assert_close(parameters[name], original[name] + delta, rtol=0, atol=1e-7)
    a.remove(other)
    assert_state_equal(other, original)


def test_same_base_in_bfloat16_is_accepted(tiny_sd_folder, two_erasures):
    a, _ = two_erasures
    half = load_model(tiny_sd_folder, dtype=torch.bfloat16)
    original = unet_state(half)
    a.apply(half)
    assert not all(torch.equal(v, original[k]) for k, v in half.unet.named_parameters())
    a.remove(half)
    assert_state_equal(half, original)


def test_erasure_for_another_architecture_fails_cleanly_even_forced(tiny_sdxl_folder, sd_model, two_erasures):
    a, _ = two_erasures
    sdxl = load_model(tiny_sdxl_folder)
    original = unet_state(sdxl)
    with pytest.raises(ErasekitError, match="no parameter"):
        a.apply(sdxl)
    with pytest.raises(ErasekitError, match="another architecture"):
        a.apply(sdxl, force=True)
    assert_state_equal(sdxl, original)
    assert sdxl.applied_erasures == [] and sdxl.original_parameters == {}

    # a delta of the wrong shape is refused before any weight changes
    names = kv_names(sd_model)
    deltas = random_deltas(sd_model, names[:2], 3)
    deltas[names[1]] = deltas[names[1]][:, :-1]
    wrong = Erasure.from_deltas(sd_model, "test", ["cat"], {}, deltas)
    before = unet_state(sd_model)
    with pytest.raises(ErasekitError, match="shape|another architecture"):
        wrong.apply(sd_model)
    assert_state_equal(sd_model, before)
    assert sd_model.original_parameters == {}


# ----------------------------------------------------------- module erasures
class RecordingModules:
    """A stand-in for Receler's erasers / CPE's gates: records attach and detach."""

    calls: list = []

    @classmethod
    def attach(cls, model, erasure, scale):
        cls.calls.append(("attach", erasure, scale))

    @classmethod
    def detach(cls, model, erasure):
        cls.calls.append(("detach", erasure))


def test_module_erasure_attaches_detaches_and_is_not_merged(sd_model, tmp_path, monkeypatch):
    monkeypatch.setitem(erasekit.modules.MODULE_ERASURES, "recording", RecordingModules)
    monkeypatch.setattr(RecordingModules, "calls", [])
    gates = Erasure(method="gates", concepts=["cat"], base_model=sd_model.name, config={},
                    modules={"gate.weight": torch.ones(4)}, module_type="recording")
    loaded = Erasure.load(gates.save(tmp_path / "gates.safetensors"))
    assert loaded.module_type == "recording" and torch.equal(loaded.modules["gate.weight"], torch.ones(4))
    assert loaded.deltas == {}

    loaded.apply(sd_model, scale=0.5)
    assert RecordingModules.calls == [("attach", loaded, 0.5)]
    with pytest.raises(ErasekitError, match="cannot be merged"):
        loaded.merge(sd_model)
    with pytest.raises(ErasekitError, match="modules"):
        save_pipeline(sd_model, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    loaded.remove(sd_model)
    assert RecordingModules.calls[-1] == ("detach", loaded)
    assert sd_model.applied_erasures == []

    unknown = Erasure(method="gates", concepts=["cat"], base_model="x", config={}, modules={"g": torch.ones(1)}, module_type="nope")
    with pytest.raises(ErasekitError, match="nope"):
        unknown.apply(sd_model)


def test_apply_erasures_loads_and_stacks(sd_model, tmp_path, two_erasures):
    a, b = two_erasures
    original = unet_state(sd_model)
    applied = apply_erasures(sd_model, [a.save(tmp_path / "a.safetensors"), b])
    assert [e.concepts for e in applied] == [["cat"], ["red"]]
    assert [e for e, _ in sd_model.applied_erasures] == applied
    for erasure in applied:
        erasure.remove(sd_model)
    assert_state_equal(sd_model, original)
