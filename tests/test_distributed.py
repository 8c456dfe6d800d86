"""Several processes on one job (torchrun, gloo on the CPU): attacks shard by prompt, the bench by cell, training is
data parallel or runs on process 0 alone, and every result equals one process's.

The multi-process runs launch ``python -m torch.distributed.run --nproc_per_node 2 -m erasekit.cli ...``
as a user would, single-threaded, on the bundled toy model with tiny budgets (each run takes seconds).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import erasekit
import erasekit.attacks
import erasekit.bench
import erasekit.resolve
from erasekit import distributed
from erasekit.errors import ErasekitError
from erasekit.methods import is_data_parallel
from erasekit.training import DataParallel

ATTACK_BUDGET = ["prompts=4", "samples=2", "inference_steps=10", "steps=6", "timesteps=4", "early_stop=false"]
ESD_SETTINGS = {"iterations": 3, "ddim_steps": 3, "batch_size": 2, "learning_rate": 1e-3}
RECELER_SETTINGS = {"iterations": 3, "ddim_steps": 3, "batch_size": 2, "adversarial_steps": 2}


def _environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(args: list[str], cwd, processes: int = 1) -> str:
    """Run ``erasekit ARGS`` in 1 process or under torchrun with ``processes``; returns stdout (fails on a non-zero exit)."""
    if processes == 1:
        command = [sys.executable, "-m", "erasekit.cli", *args]
    else:  # each process's stdout to a file of its own (one pipe would interleave their lines), read back in rank order
        logs = Path(tempfile.mkdtemp(dir=cwd, prefix=".torchrun-logs-"))
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--log-dir", str(logs),
                   "--redirects", "1", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "erasekit.cli", *args]
    done = subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=300)
    if processes == 1:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout
    files = sorted(logs.rglob("stdout.log"), key=lambda f: int(f.parent.name))
    stdout = "".join(f.read_text() for f in files)
    shutil.rmtree(logs, ignore_errors=True)
    assert done.returncode == 0, stdout[-3000:] + done.stdout[-2000:] + done.stderr[-3000:]
    assert len(files) == processes, files
    return stdout


def sets(settings: dict) -> list[str]:
    return [item for key, value in settings.items() for item in ("--set", f"{key}={value}")]


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def without_timings(value):
    """A result with its wall-clock fields ("seconds", at any depth) left out."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


@pytest.fixture(scope="module")
def model():
    return erasekit.load_model("toy")


# ----------------------------------------------------------------------------------- one process
def test_ranks_shards_and_devices_come_from_the_launcher_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main(), distributed.is_distributed()) == (0, 1, True, False)
    assert distributed.process_device("cuda") == "cuda" and distributed.start("cpu") is None
    distributed.barrier()  # one process: nothing to wait for
    items = list(range(11))
    shards = [distributed.shard(items, rank, 3) for rank in range(3)]
    assert sorted(sum(shards, [])) == items and [len(s) for s in shards] == [4, 4, 3]

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.rank() == 3 and not distributed.is_main() and distributed.is_distributed()
    assert distributed.shard(items) == [3, 7]
    assert distributed.process_device("cuda") == "cuda:1"
    assert distributed.process_device("cuda:0") == "cuda:0" and distributed.process_device(None) is None
    from erasekit.eval.generate import process_device, shard  # generate shards with the same helpers

    assert shard is distributed.shard and process_device is distributed.process_device


def test_alone_makes_this_process_the_only_one(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    items = list(range(5))
    assert distributed.shard(items) == [1, 3] and not distributed.is_main()
    with distributed.alone():  # a bench cell: its attack's prompts are all this process's, no barrier waits
        with distributed.alone():
            assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        assert not distributed.is_distributed() and distributed.shard(items) == items
        distributed.barrier()  # returns at once: no process group is joined
        assert distributed.process_device("cuda") == "cuda:1"  # still this process's GPU
    assert distributed.rank() == 1 and distributed.shard(items) == [1, 3] and "partial" not in distributed._state


def test_data_parallel_splits_the_global_batch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    alone = DataParallel(4, torch.device("cpu"))
    assert alone.rows == slice(0, 4) and alone.local_batch == 4 and alone.is_main
    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.full((3,), 2.0)
    alone.average_gradients([parameter])  # one process: the gradient is its own mean
    assert torch.equal(parameter.grad, torch.full((3,), 2.0))

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ErasekitError, match="batch_size=3 does not split evenly over 2 processes"):
        DataParallel(3, torch.device("cpu"))  # refused before any process group is joined


def test_which_methods_split_and_which_run_on_process_zero():
    assert is_data_parallel("esd") and is_data_parallel("receler")
    assert not any(is_data_parallel(name) for name in ("uce", "rece", "cpe"))


# ----------------------------------------------------------------------------------- attacks
@pytest.fixture(scope="module")
def attack_runs(model, tmp_path_factory):
    """A UCE erasure of the toy triangle, and one single-process soft-prompt attack on it (the reference)."""
    folder = tmp_path_factory.mktemp("attack")
    erasure = erasekit.erase(model, "uce", ["triangle"], preset="toy", progress=False)
    erasure.save(folder / "triangle.safetensors")
    argv = ["attack", "--model", "toy", "--erasure", "triangle.safetensors", "--concept", "triangle",
            "--attack", "soft-prompt", "--budget", *ATTACK_BUDGET]
    cli([*argv, "--out", "one"], folder)
    return folder, argv


def test_sharded_attack_writes_the_single_process_result(attack_runs):
    folder, argv = attack_runs
    stdout = cli([*argv, "--out", "two"], folder, processes=2)
    assert stdout.count("attack success rate:") == 1  # process 0 reports, once
    one, two = folder / "one", folder / "two"
    reference = json.loads((one / "result.json").read_text())
    result = json.loads((two / "result.json").read_text())
    assert reference["complete"] and reference["prompts_done"] == 4 and reference["n"] == 8
    assert without_timings(result) == without_timings(reference)
    assert json.loads((two / "run.json").read_text()) == json.loads((one / "run.json").read_text())
    for index in range(4):  # every prompt attacked once, by one of the two processes, to the same conditioning and images
        a, b = tensors(one / f"prompts/{index:03d}.safetensors"), tensors(two / f"prompts/{index:03d}.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), index
    assert (one / "grid.png").read_bytes() == (two / "grid.png").read_bytes()


def test_attack_resumes_with_another_number_of_processes(attack_runs):
    folder, argv = attack_runs
    one = folder / "one"
    reference = json.loads((one / "result.json").read_text())
    for processes, kept in ((2, [0, 2]), (1, [1])):  # a one-process run finished by two, a two-process run by one
        resumed = folder / f"resumed-{processes}"
        if processes == 2:
            shutil.copytree(one, resumed)
        else:
            shutil.copytree(folder / "resumed-2", resumed)
        for index in set(range(4)) - set(kept):
            (resumed / f"prompts/{index:03d}.json").unlink()
        (resumed / "result.json").unlink()
        before = {index: (resumed / f"prompts/{index:03d}.json").read_text() for index in kept}
        cli([*argv, "--out", resumed.name], folder, processes=processes)
        result = json.loads((resumed / "result.json").read_text())
        assert without_timings(result) == without_timings(reference)
        for index in kept:  # finished prompts are read back, not attacked again (their timings are the old run's)
            assert (resumed / f"prompts/{index:03d}.json").read_text() == before[index]
            assert result["per_prompt"][index] == json.loads(before[index])


@pytest.mark.slow
def test_sharded_textual_inversion_learns_its_token_once(attack_runs):
    """Process 0 prepares first (learns v* and saves it), the other process reads it: one token, the same result
    (the other process's records say they read the token: ``info.reused``)."""
    folder, argv = attack_runs
    budget = ["prompts=4", "samples=2", "inference_steps=10", "steps=10", "images=4", "batch_size=4", "gradient_accumulation=1"]
    base = [*argv[: argv.index("--attack")], "--attack", "textual-inversion", "--budget", *budget]
    cli([*base, "--out", "ti-one"], folder)
    stdout = cli([*base, "--out", "ti-two"], folder, processes=2)
    assert stdout.count("attack success rate:") == 1
    one, two = folder / "ti-one", folder / "ti-two"
    reference, result = json.loads((one / "result.json").read_text()), json.loads((two / "result.json").read_text())
    assert [r["info"].pop("reused", None) for r in result["per_prompt"]] == [None, "textual_inversion.safetensors"] * 2
    assert without_timings(result) == without_timings(reference)
    learned_one, learned_two = tensors(one / "textual_inversion.safetensors"), tensors(two / "textual_inversion.safetensors")
    assert all(torch.equal(learned_one[k], learned_two[k]) for k in learned_one)


# ---------------------------------------------------------------------------------- training
def _erase_argv(method: str, settings: dict, out: str, preset: str | None = None) -> list[str]:
    return ["erase", "--model", "toy", "--method", method, "--concept", "triangle", *(["--preset", preset] if preset else []),
            *sets(settings), "--out", out]


@pytest.mark.parametrize("method, settings, preset", [("esd", ESD_SETTINGS, None), ("receler", RECELER_SETTINGS, "toy")])
def test_data_parallel_training_equals_one_process_with_the_same_global_batch(model, tmp_path, method, settings, preset):
    single = erasekit.erase(model, method, ["triangle"], preset=preset, overrides={k: str(v) for k, v in settings.items()},
                            progress=False)
    stdout = cli(_erase_argv(method, settings, "two.safetensors", preset), tmp_path, processes=2)
    assert stdout.count("saved to") == 1  # process 0 writes the file, once
    parallel = erasekit.Erasure.load(tmp_path / "two.safetensors")
    assert parallel.info["processes"] == 2 and single.info["processes"] == 1
    assert parallel.info["iterations"] == single.info["iterations"] == 3
    # the reported losses are the global batch's (the mean over the processes' rows), as one process reports them
    torch.testing.assert_close(torch.tensor(parallel.info["loss_curve"]), torch.tensor(single.info["loss_curve"]), rtol=1e-3, atol=1e-7)
    reference, result = tensors_of(single, tmp_path / "one.safetensors"), tensors(tmp_path / "two.safetensors")
    assert set(reference) == set(result)
    scale = max(v.abs().max().item() for v in reference.values())
    difference = max((reference[k] - result[k]).abs().max().item() for k in reference)
    # the trained values moved (3 Adam steps at lr 1e-3, ~1e-3 each) and both runs moved them alike, up to float
    # rounding (batch-1 and batch-2 kernels differ in the last bits; measured: 1e-6 apart)
    assert scale > 5e-4, scale
    assert difference < 0.02 * scale, (difference, scale)


def tensors_of(erasure, path) -> dict[str, torch.Tensor]:
    erasure.save(path)
    return tensors(path)


def test_data_parallel_refuses_a_batch_that_does_not_split(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "erasekit.cli",
               *_erase_argv("esd", {**ESD_SETTINGS, "batch_size": 1}, "odd.safetensors")]
    done = subprocess.run(command, cwd=tmp_path, env=_environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "batch_size=1 does not split evenly over 2 processes" in done.stderr
    assert not (tmp_path / "odd.safetensors").exists()


def test_closed_form_method_runs_on_process_zero_alone(model, tmp_path):
    single = erasekit.erase(model, "uce", ["triangle"], preset="toy", progress=False)
    stdout = cli(_erase_argv("uce", {}, "two.safetensors", preset="toy"), tmp_path, processes=2)
    assert stdout.count("saved to") == 1
    reference, result = tensors_of(single, tmp_path / "one.safetensors"), tensors(tmp_path / "two.safetensors")
    assert set(reference) == set(result)
    # the same solve, up to float rounding: the launched processes run at one thread, this one perhaps at more
    scale = max(v.abs().max().item() for v in reference.values())
    assert scale > 0 and max((reference[k] - result[k]).abs().max().item() for k in reference) <= 1e-4 * scale


# ----------------------------------------------------------------------------------- the bench
BENCH_TOML = """
methods = ["uce"]
concepts = ["triangle", "cross"]
attacks = ["paraphrase"]
samples_per_prompt = 1
prompts_per_concept = 2
prompts_per_other_value = 1
held_out_per_word = 1
grid_seeds = 1

[attack_budgets.paraphrase]
prompts = 1
samples = 1
"""
TIMING_FIELDS = {"seconds", "cpu_seconds", "erase_seconds", "erase_cpu_seconds"}


def without_bench_timings(value):
    """A bench record without its timings, nor the erasure file's hash (the file holds the seconds it took)."""
    if isinstance(value, dict):
        return {k: without_bench_timings({**v, "erasure": None} if k == "settings" else v)
                for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list):
        return [without_bench_timings(v) for v in value]
    return value


def computed_units(stdout: str, rank: int | None = None) -> dict[str, int]:
    """How many units a run (``rank``: that process of it) computed, from the notes it prints for each (a cached unit
    prints 'cached' or 'reusing')."""
    note = r"^(?:rank \d/\d)? +" if rank is None else rf"^rank {rank}/\d +"  # (several processes: the rank first)
    return {"erasures": len(re.findall(note + r"[\d.]+s, [\d,]+ trainable values$", stdout, re.M)),
            "evaluations": len(re.findall(note + r"concept \d+%, others", stdout, re.M)),
            "attacks": len(re.findall(note + r"success rate ", stdout, re.M))}


@pytest.mark.slow
def test_sharded_bench_writes_the_single_process_results_and_resumes_with_one_process(tmp_path, monkeypatch):
    """Two processes share the cells (measured: ~90 s for both runs on a busy 2-core machine, hence slow)."""
    (tmp_path / "bench.toml").write_text(BENCH_TOML)
    argv = ["bench", "--config", "bench.toml"]
    single = cli([*argv, "--out", "one"], tmp_path)
    sharded = cli([*argv, "--out", "two"], tmp_path, processes=2)
    once = {"erasures": 2, "evaluations": 4, "attacks": 2}  # 2 concepts: 2 erasures, 4 evaluations (2 unerased), 2 attacks
    assert computed_units(single) == computed_units(sharded) == once  # every unit computed once, by one process
    assert "cached" not in sharded and sharded.count("report:") == 1  # process 0 writes the report, once
    for rank in (0, 1):  # each process took a method's cell and an unerased cell (the methods' cells are shared out first)
        assert computed_units(sharded, rank) == {"erasures": 1, "evaluations": 2, "attacks": 1}, sharded
        assert len(re.findall(rf"^rank {rank}/2 \[.*\] erase ", sharded, re.M)) == 1, sharded

    one, two = tmp_path / "one", tmp_path / "two"
    reference, results = json.loads((one / "results.json").read_text()), json.loads((two / "results.json").read_text())
    assert [(r["method"], r["concept"]) for r in results["rows"]] == [
        ("original", "triangle"), ("uce", "triangle"), ("original", "cross"), ("uce", "cross")]
    assert without_bench_timings(results["rows"]) == without_bench_timings(reference["rows"])
    assert {k: v for k, v in results.items() if k not in ("rows", "timings")} == \
        {k: v for k, v in reference.items() if k not in ("rows", "timings")}
    for concept in ("triangle", "cross"):
        a, b = tensors(one / f"erasures/uce-{concept}.safetensors"), tensors(two / f"erasures/uce-{concept}.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        for key in (f"original-{concept}", f"uce-{concept}"):
            evaluations = [json.loads((folder / f"evaluations/{key}.json").read_text()) for folder in (one, two)]
            assert without_bench_timings(evaluations[0]) == without_bench_timings(evaluations[1])
            assert (two / f"images/{key}.png").read_bytes() == (one / f"images/{key}.png").read_bytes()
        attack = f"attacks/uce-{concept}/paraphrase/result.json"
        assert without_timings(json.loads((two / attack).read_text())) == without_timings(json.loads((one / attack).read_text()))
    assert (two / "index.html").is_file() and (two / "report.md").is_file()

    # one process resumes the two processes' folder: every unit comes from its files, none is written again
    units = [p for folder in ("erasures", "evaluations", "images", "attacks") for p in (two / folder).rglob("*") if p.is_file()]
    written = {p: p.stat().st_mtime_ns for p in units}

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed a cached unit")

    for module, name in ((erasekit.resolve, "erase"), (erasekit.bench, "evaluate_concept"), (erasekit.bench, "write_grid"),
                         (erasekit.attacks, "run_attack")):
        monkeypatch.setattr(module, name, forbidden)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    erasekit.bench.run_bench(erasekit.bench.load_bench_config(tmp_path / "bench.toml"), two, progress=False)
    assert {p: p.stat().st_mtime_ns for p in units} == written
    again = json.loads((two / "results.json").read_text())
    assert again["rows"] == results["rows"]
