"""benchmarks/gpu.py runs end to end on a CPU: --dry-run (tiny configs) prints its table and writes its JSON,
and --estimate-memory gives the README's estimates from the real configs' shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
ROWS = [(method, setting) for method, setting in [
    ("uce", "paper"), ("rece", "paper"), ("cpe", "paper"), ("esd", "paper (fp32)"), ("esd", "paper + bf16 + ckpt"),
    ("receler", "paper (fp32)"), ("receler", "paper + bf16 + ckpt"), ("generate", "erasekit generate"),
    ("generate", "diffusers pipeline"),
]]


def run_bench(args: list[str], cwd) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(BENCH), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_dry_run_prints_one_table_and_writes_every_row(tmp_path):
    stdout = run_bench(["--dry-run", "--json", "bench.json"], tmp_path)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["dry_run"] is True and result["environment"]["device"] == "cpu"
    rows = result["rows"]
    assert [(r["model"], r["method"], r["setting"]) for r in rows] == [(m, *row) for m in ("sd14", "sdxl") for row in ROWS]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    for r in rows:
        assert r["rate"] > 0, r
        if r["method"] == "generate":
            assert r["unit"] == "img/s" and r["images"] == 2
        else:
            assert r["full_s"] > 0
            assert r["full"] == ("measured" if r["method"] in ("uce", "rece") else "extrapolated")
    for r in rows:
        if r["method"] in ("esd", "receler"):  # the full run is the timed iteration times the preset's iterations
            assert r["paper_iterations"] == (1000 if r["method"] == "esd" else 500)
            assert abs(r["full_s"] - r["rate"] * r["paper_iterations"]) < 1e-6 * r["full_s"]
        if r["method"] == "cpe":
            assert r["paper_steps"] == 1800 + 4 * 450 + 4 * 450
    ours = [r for r in rows if r["setting"] == "erasekit generate"]
    assert all(r["vs_diffusers"] > 0 for r in ours)

    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert lines[0].split("|")[1].strip() == "model" and "full run at paper preset" in lines[0] and "peak GiB" in lines[0]
    assert len(lines) == 2 + len(rows)  # header, rule, one line per row: one table
    assert "extrapolated" in stdout and "measured" in stdout and "img/s" in stdout


def test_memory_estimates_follow_from_the_real_configs(tmp_path):
    stdout = run_bench(["--estimate-memory", "--json", "memory.json"], tmp_path)
    rows = {(r["model"], r["method"], r["setting"]): r for r in json.loads((tmp_path / "memory.json").read_text())["rows"]}
    sd, xl = rows[("sd14", "esd", "paper: ESD-x, fp32")], rows[("sdxl", "esd", "paper: ESD-x, fp32")]
    # float32 weights of the whole pipeline: SD 1.4 1.07 B values, SDXL 3.47 B
    assert 3.9 < sd["weights_gib"] < 4.1 and 12.7 < xl["weights_gib"] < 13.1
    for model in ("sd14", "sdxl"):
        esd_x, esd_u = rows[(model, "esd", "paper: ESD-x, fp32")], rows[(model, "esd", "ESD-u (noxattn), fp32")]
        assert esd_u["training_state_gib"] > 3 * esd_x["training_state_gib"]  # SD 1.4: 18x, SDXL: 3.7x
        switched = rows[(model, "esd", "ESD-x, bf16 + ckpt")]
        assert switched["activations_gib"] < esd_x["activations_gib"] / 3 and switched["total_gib"] < esd_x["total_gib"]
        assert rows[(model, "uce", "paper")]["total_gib"] < esd_x["total_gib"]
    assert xl["activations_gib"] > 4 * sd["activations_gib"]  # 4x the pixels, wider and deeper transformers
    assert "estimate" in stdout
