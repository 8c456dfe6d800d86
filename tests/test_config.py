"""Configs as data: one typed parser for --set, --budget and the bench TOML; --help lists every key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from erasekit.attacks import ATTACKS, make_attack
from erasekit.bench import BenchConfig, load_bench_config
from erasekit.cli import main
from conftest import cli_error as _error
from erasekit.config import describe, parse_config
from erasekit.errors import ErasekitError
from erasekit.methods import METHODS, build_config, get_method
from erasekit.toy.train import ToyTrainConfig


@dataclass
class Example:
    flag: bool = field(default=False, metadata={"help": "A switch."})
    count: int = field(default=3, metadata={"help": "A count.", "min": 1, "max": 10})
    rate: float = field(default=0.5, metadata={"help": "A rate.", "gt": 0})
    words: list[str] = field(default_factory=list, metadata={"help": "Words."})
    sizes: tuple[int, ...] = field(default=(1, 2), metadata={"help": "Sizes."})
    limit: int | None = field(default=None, metadata={"help": "A limit or none."})
    mode: str = field(default="a", metadata={"help": "A mode.", "choices": ("a", "b")})
    kind: Literal["x", "y"] = field(default="x", metadata={"help": "A literal."})
    table: dict[str, int] = field(default_factory=dict, metadata={"help": "A table."})


def _erase(*sets, method="esd"):
    return ["erase", "--method", method, "--concept", "triangle", "--out", "never-written.safetensors",
            *[a for s in sets for a in ("--set", s)]]


def _attack(*budget, attack="p4d"):
    return ["attack", "--attack", attack, "--erasure", "never-read.safetensors", "--concept", "triangle", "--out", "never",
            "--budget", *budget]


def _config_classes():
    classes = [get_method(name).CONFIG for name in METHODS]
    classes += list({cls.config_class for cls in ATTACKS.values()})
    return [*classes, BenchConfig, ToyTrainConfig]


# ------------------------------------------------------------------------- the parser
def test_int_field_takes_integral_float_text_the_same_for_set_and_budget():
    assert build_config("esd", overrides={"iterations": "1e3"}).iterations == 1000
    assert type(build_config("esd", overrides={"iterations": "1e3"}).iterations) is int
    assert make_attack("p4d", {"steps": "1e3"}, source="--budget").config.steps == 1000
    assert build_config("esd", overrides={"iterations": 1000.0}).iterations == 1000
    assert make_attack("ring-a-bell", {"steps": "2e1"}).config.generations == 20


@pytest.mark.parametrize("text", ["1.5", "1e-3", "ten", "nan", "inf"])
def test_non_integral_int_is_refused(capsys, text):
    err = _error(capsys, _erase(f"iterations={text}"))
    assert f"--set iterations={text}" in err and "whole number" in err and "--set iterations=" in err.split(";")[-1]
    err = _error(capsys, _attack(f"steps={text}"))
    assert f"--budget steps={text}" in err and "whole number" in err


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "NaN", "infinity"])
def test_floats_must_be_finite(capsys, text):
    err = _error(capsys, _erase(f"learning_rate={text}"))
    assert "learning_rate" in err and "finite" in err
    with pytest.raises(ErasekitError, match="finite"):
        make_attack("p4d", {"learning_rate": text})
    with pytest.raises(ErasekitError, match="finite"):
        build_config("esd", overrides={"learning_rate": float(text)})


def test_unknown_key_names_the_valid_keys(capsys):
    err = _error(capsys, _erase("iteratons=5"))
    assert "iteratons" in err and "valid keys" in err and "iterations" in err and "learning_rate" in err
    err = _error(capsys, _attack("stpes=5"))
    assert "stpes" in err and "--budget" in err and "check_every" in err


def test_bounds_and_choices_from_metadata(capsys):
    assert "at least 1" in _error(capsys, _erase("iterations=0"))
    assert "greater than 0" in _error(capsys, _erase("learning_rate=0"))
    assert "bf16" in _error(capsys, _erase("mixed_precision=int8"))
    assert "at least 1" in _error(capsys, _attack("samples=0"))
    assert "N, K" in _error(capsys, _attack("variant=Z"))
    assert "at most 1" in _error(capsys, _attack("mutation=1.5", attack="ring-a-bell"))
    assert build_config("esd", overrides={"mixed_precision": "none"}).mixed_precision is None


def test_types_bool_list_optional_literal():
    config = parse_config(Example, {"flag": "yes", "count": "1e1", "rate": "2", "words": "a, b,c", "sizes": "[3, 4]",
                                    "limit": "null", "mode": "b", "kind": "y", "table": '{"k": 1}'})
    assert config == Example(True, 10, 2.0, ["a", "b", "c"], (3, 4), None, "b", "y", {"k": 1})
    assert parse_config(Example, {"flag": "off", "words": '["a,b", "c"]', "limit": "7"}).words == ["a,b", "c"]
    assert parse_config(Example, {"flag": False, "words": ["x"], "limit": 7, "sizes": [5]}).sizes == (5,)
    assert parse_config(Example, {"words": ""}).words == []
    for bad in ({"flag": "maybe"}, {"count": "11"}, {"rate": "-1"}, {"sizes": "[1.5]"}, {"kind": "z"}, {"limit": "many"},
                {"words": "[1, 2]"}, {"table": "[1]"}, {"count": True}, {"mode": 3}):
        with pytest.raises(ErasekitError) as error:
            parse_config(Example, bad)
        assert len(str(error.value).splitlines()) == 1 and next(iter(bad)) in str(error.value)
    esd = build_config("esd", overrides={"gradient_checkpointing": "true", "resolution": "none", "erase_from": "a hat"})
    assert (esd.gradient_checkpointing, esd.resolution, esd.erase_from) == (True, None, "a hat")


def test_typed_source_does_not_parse_strings():
    assert parse_config(Example, {"count": 2.0}, source="x.toml", strings=False).count == 2
    for bad in ({"count": "2"}, {"flag": "true"}, {"limit": "none"}, {"words": "a,b"}):
        with pytest.raises(ErasekitError, match=f"x.toml: {next(iter(bad))} = "):
            parse_config(Example, bad, source="x.toml", strings=False)


@pytest.mark.parametrize("line, key", [
    ("samples_per_prompt = 'two'", "samples_per_prompt"),
    ("samples_per_prompt = 1.5", "samples_per_prompt"),
    ("samples_per_prompt = 0", "samples_per_prompt"),
    ("attack_original = 1", "attack_original"),
    ("methods = 'uce'", "methods"),
    ("name = 3", "name"),
    ("grid_seeds = nan", "grid_seeds"),
])
def test_bench_toml_wrong_type_is_one_line(tmp_path, capsys, line, key):
    path = tmp_path / "bench.toml"
    path.write_text(f"concepts = ['triangle']\n{line}\n")
    with pytest.raises(ErasekitError, match=f"bench.toml: {key} = "):
        load_bench_config(path)
    err = _error(capsys, ["bench", "--config", str(path), "--out", str(tmp_path / "out")])
    assert key in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_bench_toml_typed_values_are_kept(tmp_path):
    path = tmp_path / "bench.toml"
    path.write_text("methods = ['uce']\nconcepts = ['triangle']\nattacks = ['p4d']\nsamples_per_prompt = 3.0\n"
                    "[attack_budgets.p4d]\nsteps = 2e1\n")
    config = load_bench_config(path)
    assert config.samples_per_prompt == 3 and type(config.samples_per_prompt) is int
    assert make_attack("p4d", config.attack_budgets["p4d"]).config.steps == 20


# ------------------------------------------------------------------------- --help
def test_erase_help_lists_the_method_config_and_presets(capsys):
    cpe = get_method("cpe")
    for argv in (["erase", "--method", "cpe", "--help"], ["erase", "--help", "--method=cpe"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: erasekit erase")
        for f in dataclasses.fields(cpe.CONFIG):
            assert f"  {f.name}: " in out, f.name
        for preset in cpe.PRESETS:
            assert f"  {preset} " in out, preset


def test_attack_help_lists_the_budget_keys(capsys):
    from erasekit.attacks import P4DConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["attack", "--attack", "p4d", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: erasekit attack")
    for f in dataclasses.fields(P4DConfig):
        assert f"  {f.name}: " in out and f.metadata["help"] in out, f.name


def test_help_without_a_name_points_to_the_listing(capsys):
    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    assert "erasekit methods" in capsys.readouterr().out


def test_methods_and_attacks_commands(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"== {name} ==" in out
        for f in dataclasses.fields(get_method(name).CONFIG):
            assert f"  {f.name}: " in out
    assert main(["methods", "uce"]) == 0
    assert "== uce ==" in capsys.readouterr().out
    assert main(["attacks", "ring-a-bell"]) == 0
    assert "generations" in capsys.readouterr().out
    assert main(["attacks"]) == 0
    out = capsys.readouterr().out
    assert all(f"== {name} ==" in out for name in ATTACKS)
    assert "unknown method 'magic'" in _error(capsys, ["methods", "magic"])
    assert "unknown attack 'magic'" in _error(capsys, ["attacks", "magic"])


def test_describe_shows_type_default_bounds_help_and_presets():
    text = describe(Example, {"fast": {"count": 5}})
    assert "  count: int = 3  [>= 1, <= 10]" in text and "      A count." in text
    assert "  limit: int or none = None" in text and "  words: list of str = []" in text
    assert "fast  count=5" in text


# ------------------------------------------------------------------------- every config
@pytest.mark.parametrize("config_cls", _config_classes(), ids=lambda cls: cls.__name__)
def test_every_field_has_help(config_cls):
    for f in dataclasses.fields(config_cls):
        assert isinstance(f.metadata.get("help"), str) and f.metadata["help"].strip(), f"{config_cls.__name__}.{f.name}"
        assert set(f.metadata) <= {"help", "min", "max", "gt", "lt", "choices"}, f"{config_cls.__name__}.{f.name}"


@pytest.mark.parametrize("config_cls", _config_classes(), ids=lambda cls: cls.__name__)
def test_defaults_pass_their_own_checks(config_cls):
    from erasekit.config import check_config

    check_config(config_cls())


@pytest.mark.parametrize("method", list(METHODS))
def test_every_preset_parses(method):
    for preset in get_method(method).PRESETS:
        build_config(method, preset)


def test_a_preset_layer_for_a_kind_goes_on_top_of_the_preset_for_concepts_of_that_kind(monkeypatch):
    import erasekit
    import erasekit.resolve

    monkeypatch.setitem(get_method("uce").PRESETS, "toy:color", {"lamb": 0.25})
    base = build_config("uce", "toy")
    assert build_config("uce", "toy", kind="color").lamb == 0.25 != base.lamb
    assert build_config("uce", "toy", kind="shape") == base == build_config("uce", "toy")
    assert build_config("uce", "toy", {"lamb": "0.75"}, kind="color").lamb == 0.75  # --set still has the last word
    seen = []
    monkeypatch.setattr(erasekit.resolve, "run_method", lambda model, method, targets, config, progress: seen.append(config))
    model = erasekit.load_model("toy")
    for concepts in (["red"], ["circle"], ["red", "circle"]):  # the layer applies when every concept is of its kind
        erasekit.erase(model, "uce", concepts, preset="toy")
    assert [config.lamb for config in seen] == [0.25, base.lamb, base.lamb]
