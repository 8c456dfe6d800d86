"""erasekit bench: the config, the report writer, a resumable end-to-end run, and the HTML in a real browser."""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import erasekit.attacks
import erasekit.bench
import erasekit.resolve
from conftest import cli_error
from erasekit.bench import DEFAULT_CONFIG, DEMO_CONFIG, BenchConfig, load_bench_config, run_bench, toy_concept
from erasekit.cli import main
from erasekit.errors import ErasekitError
from erasekit.eval.report import ATTACK_BARS, SCATTER, write_report

ALL_ATTACKS = ["paraphrase", "soft-prompt", "ring-a-bell", "p4d", "closed-form", "textual-inversion"]
ALL_METHODS = ["uce", "rece", "esd", "receler", "cpe"]


# ------------------------------------------------------------------ config
def test_shipped_configs():
    default = load_bench_config()
    assert sorted(default.methods) == sorted(ALL_METHODS)
    assert sorted(default.attacks) == sorted(ALL_ATTACKS) and set(default.attack_budgets) == set(ALL_ATTACKS)
    assert [toy_concept(c).attribute for c in default.concepts].count("shape") == 2
    assert [toy_concept(c).attribute for c in default.concepts].count("style") == 1
    demo = load_bench_config(DEMO_CONFIG)
    assert sorted(demo.methods) == sorted(ALL_METHODS) and demo.attacks == ["paraphrase", "soft-prompt"]
    assert len(demo.concepts) == 1 and toy_concept(demo.concepts[0]).attribute == "shape"


def test_quick_overrides_merge_into_budgets():
    full, quick = load_bench_config(DEFAULT_CONFIG), load_bench_config(DEFAULT_CONFIG, quick=True)
    assert quick.samples_per_prompt < full.samples_per_prompt
    assert quick.attack_budgets["soft-prompt"]["steps"] < full.attack_budgets["soft-prompt"]["steps"]
    # keys the [quick] table does not set are kept
    assert quick.attack_budgets["soft-prompt"]["prompts"] == full.attack_budgets["soft-prompt"]["prompts"]
    assert quick.attack_budgets["paraphrase"] == full.attack_budgets["paraphrase"]


def test_toy_concepts():
    assert toy_concept("three-sided shape") == toy_concept("triangle")
    assert toy_concept("triangle").erase_text == "triangle"
    stripes = toy_concept("striped")
    assert (stripes.name, stripes.attribute, stripes.erase_text) == ("stripes", "style", "striped")
    with pytest.raises(ErasekitError, match="not a toy-world concept"):
        toy_concept("banana")


def _refused_in_one_line(path, out, message, capsys) -> None:
    """The bench config at ``path`` is refused with ``message``: in Python, and on the CLI in one line before ``out`` exists."""
    with pytest.raises(ErasekitError, match=message):
        load_bench_config(path)
    cli_error(capsys, ["bench", "--config", str(path), "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("text, message", [
    ("methods = ['uce']\nconcepts = ['triangle']\nsampels_per_prompt = 1\n", "unknown key.*sampels_per_prompt"),
    ("methods = ['uce']\nconcepts = ['triangle']\nsamples_per_prompt = 'two'\n", "samples_per_prompt.*int"),
    ("methods = ['magic']\nconcepts = ['triangle']\n", "unknown method 'magic'"),
    ("methods = ['uce']\nconcepts = ['banana']\n", "not a toy-world concept"),
    ("methods = ['uce']\nconcepts = ['triangle']\nattacks = ['magic']\n", "unknown attack 'magic'"),
    ("methods = ['uce']\nconcepts = ['triangle']\nattacks = []\n[attack_budgets.p4d]\nsteps = 1\n", "attack_budgets has 'p4d'"),
    ("methods = ['uce']\nconcepts = ['triangle']\nattacks = ['p4d']\n[attack_budgets.p4d]\nstpes = 1\n", "attack_budgets.p4d: unknown budget key 'stpes'"),
    ("methods = ['uce'\n", "not valid TOML"),
])
def test_bad_config_is_one_line_error(tmp_path, capsys, text, message):
    path = tmp_path / "bench.toml"
    path.write_text(text)
    _refused_in_one_line(path, tmp_path / "out", message, capsys)


def test_missing_config_and_results(tmp_path, capsys):
    assert main(["bench", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "--report-only", "--out", str(tmp_path)]) == 2
    assert "results.json does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------ report
def _png(path: Path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)


def synthetic_results(out: Path) -> dict:
    """A results.json as run_bench writes it: two methods, a shape and a style, two attacks (one failed)."""
    rows = []
    numbers = {("original", "triangle"): (0.9, 0.85, 0.6, 12.5), ("uce", "triangle"): (0.05, 0.8, 0.1, 20.25),
               ("esd", "triangle"): (0.15, 0.7, 0.3, 31.0), ("original", "stripes"): (0.95, 0.9, 0.7, 12.0),
               ("uce", "stripes"): (0.35, 0.88, 0.4, 15.5), ("esd", "stripes"): (0.25, 0.6, 0.2, 40.75)}
    for (method, concept), (erased, other, held, fid) in numbers.items():
        image = f"images/{method}-{concept}.png"
        _png(out / image, (200, 50, 50) if method == "original" else (50, 50, 200))
        attacks = {}
        if method != "original":
            attacks = {"paraphrase": {"attack": "paraphrase", "success_rate": held / 2, "n": 20, "budget": {"prompts": 4}, "seed": 0, "seconds": 3.0},
                       "closed-form": ({"attack": "closed-form", "success_rate": None, "error": "needs to_k/to_v deltas", "seconds": 0.1}
                                       if method == "esd" else
                                       {"attack": "closed-form", "success_rate": 0.75, "n": 4, "budget": {}, "seed": 0, "seconds": 2.0})}
        rows.append({"method": method, "concept": concept, "attribute": "shape" if concept == "triangle" else "style",
                     "erased_accuracy": erased, "other_accuracy": other, "held_out_accuracy": held, "toy_fid": fid,
                     "erase_seconds": None if method == "original" else 1.5, "erase_cpu_seconds": None if method == "original" else 1.25,
                     "trainable_parameters": 0 if method == "original" else 344064, "attacks": attacks, "image": image,
                     "seconds": {"evaluate": 2.0, "grid": 1.0}, "cpu_seconds": {"evaluate": 1.5, "grid": 0.5}})
    results = {"format": 1, "name": "synthetic <bench>", "model": "toy", "config": {}, "protocol": {"name": "toy", "version": "1"},
               "seeds": {"erase": 0, "evaluate": 0, "attack": 0, "grid": [0, 1]},
               "versions": {"erasekit": "0.1.0", "torch": "x", "diffusers": "y"},
               "methods": ["uce", "esd"], "concepts": [{"name": "triangle", "attribute": "shape"}, {"name": "stripes", "attribute": "style"}],
               "attacks": ["paraphrase", "closed-form"], "rows": rows,
               "timings": {"seconds": {"load": 5, "erase": {"uce": 3.0, "esd": 3.0}, "evaluate": 12, "grids": 6,
                                       "attacks": {"paraphrase": 12, "closed-form": 4.1}, "total": 45.1},
                           "cpu_seconds": {"load": 4, "erase": {"uce": 2.5, "esd": 2.5}, "evaluate": 9, "grids": 3,
                                           "attacks": {"paraphrase": 10, "closed-form": 3}, "total": 34},
                           "this_run_seconds": 45.1}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results))
    return results


@pytest.fixture
def synthetic_report(tmp_path) -> Path:
    out = tmp_path / "report"
    synthetic_results(out)
    write_report(out)
    return out


def _markdown_table(markdown: str, title: str) -> list[list[str]]:
    section = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|") and "---" not in line]


def test_report_tables_plots_and_images(synthetic_report):
    out = synthetic_report
    markdown = (out / "report.md").read_text()
    assert _markdown_table(markdown, "Efficacy") == [["method", "triangle", "stripes"], ["original", "90%", "95%"],
                                                     ["uce", "5%", "35%"], ["esd", "15%", "25%"]]
    assert _markdown_table(markdown, "Locality")[2] == ["uce", "80%", "88%"]
    assert _markdown_table(markdown, "Robustness: triangle") == [
        ["method", "held-out paraphrases", "paraphrase", "closed-form"], ["original", "60%", "–", "–"],
        ["uce", "10%", "5% (1/20)", "75% (3/4)"], ["esd", "30%", "15% (3/20)", "n/a [1]"]]
    assert "[1] closed-form on esd: not run (needs to_k/to_v deltas)" in markdown
    assert _markdown_table(markdown, "Fidelity")[3] == ["esd", "31.00", "40.75"]
    assert _markdown_table(markdown, "Cost")[1] == ["uce", "triangle", "1.5", "1.2", "344,064"]
    for image in ["images/original-triangle.png", "images/uce-stripes.png", "images/esd-triangle.png", SCATTER, ATTACK_BARS]:
        assert f"]({image})" in markdown
    for plot in (SCATTER, ATTACK_BARS):
        with Image.open(out / plot) as picture:
            assert picture.size[0] > 300 and picture.size[1] > 200

    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    assert page.count("<table") == 6  # efficacy, locality, robustness x2, fidelity, cost
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 6 + 2 and all(not Path(s).is_absolute() and (out / s).is_file() for s in sources)
    assert "synthetic &lt;bench&gt;" in page  # escaped
    assert "<td>n/a [1]</td>" in page and "needs to_k/to_v deltas" in page


def test_report_shows_counts_and_warns_when_the_unerased_model_does_not_draw_the_concept(tmp_path, capsys):
    out = tmp_path / "report"
    results = synthetic_results(out)
    for row in results["rows"]:
        if row["concept"] == "triangle":
            shown = {"original": 2, "uce": 0, "esd": 1}[row["method"]]
            row["erased_accuracy"] = shown / 16
            row["counts"] = {"erased": {"rate": shown / 16, "shown": shown, "n": 16, "ci95": [0.0, 0.4]},
                             "other": {"rate": row["other_accuracy"], "shown": round(row["other_accuracy"] * 80), "n": 80,
                                       "ci95": [0.6, 0.9]}}
    (out / "results.json").write_text(json.dumps(results))
    write_report(out)
    markdown = (out / "report.md").read_text()
    assert _markdown_table(markdown, "Efficacy")[1:] == [["original", "12% (2/16)", "95%"], ["uce", "0% (0/16)", "35%"],
                                                         ["esd", "6% (1/16)", "25%"]]
    assert _markdown_table(markdown, "Locality")[2] == ["uce", "80% (64/80)", "88%"]
    warning = "the unerased model draws 'triangle' in only 12% of the images asked for it (2/16 images)"
    assert markdown.count(warning) == 2  # at the top and under the efficacy table
    assert "stripes' in only" not in markdown
    assert html.escape(warning) in (out / "index.html").read_text()


def test_report_is_a_pure_function_of_results(synthetic_report, tmp_path):
    out = synthetic_report
    first = {name: (out / name).read_text() for name in ("report.md", "index.html")}
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for name in ("report.md", "index.html"):
        (copy / name).unlink()
    shutil.rmtree(copy / "plots")
    write_report(copy)
    assert {name: (copy / name).read_text() for name in first} == first
    assert (copy / SCATTER).is_file() and (copy / ATTACK_BARS).is_file()
    # a missing image is reported, not linked
    (copy / "images" / "uce-triangle.png").unlink()
    write_report(copy)
    assert "after uce: (image missing)" in (copy / "report.md").read_text()
    assert 'src="images/uce-triangle.png"' not in (copy / "index.html").read_text()


def test_report_only_cli(synthetic_report, capsys):
    (synthetic_report / "index.html").unlink()
    assert main(["bench", "--report-only", "--out", str(synthetic_report)]) == 0
    assert str((synthetic_report / "index.html").resolve()) in capsys.readouterr().out
    assert (synthetic_report / "index.html").is_file()


# ------------------------------------------------------------- end to end
TINY = dict(methods=["uce"], concepts=["triangle"], attacks=["paraphrase"], attack_budgets={"paraphrase": {"prompts": 1, "samples": 1}},
            samples_per_prompt=1, prompts_per_concept=3, prompts_per_other_value=1, held_out_per_word=1, grid_seeds=1)


def test_bench_end_to_end_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "bench"
    index = run_bench(BenchConfig(**TINY), out, progress=False)
    assert index == out / "index.html" and index.is_file() and (out / "report.md").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["name"] == "toy" and results["protocol"]["samples_per_prompt"] == 1
    assert set(results["versions"]) >= {"erasekit", "torch", "diffusers"} and results["seeds"]["evaluate"] == 0
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"original", "uce"}
    assert rows["uce"]["erased_accuracy"] < rows["original"]["erased_accuracy"]  # UCE's toy preset removes the triangle
    assert rows["uce"]["toy_fid"] > 0
    erasure = erasekit.Erasure.load(out / "erasures" / "uce-triangle.safetensors")
    assert rows["uce"]["trainable_parameters"] == erasure.num_parameters > 0
    attack = rows["uce"]["attacks"]["paraphrase"]
    assert attack["n"] == 1 and 0 <= attack["success_rate"] <= 1 and (out / attack["result"]).is_file()
    assert (out / "images" / "uce-triangle.png").is_file() and (out / "images" / "original-triangle.png").is_file()

    # a rerun recomputes nothing: every unit comes from its cache
    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed a cached unit")

    monkeypatch.setattr(erasekit.resolve, "erase", forbidden)
    monkeypatch.setattr(erasekit.bench, "evaluate_concept", forbidden)
    monkeypatch.setattr(erasekit.bench, "write_grid", forbidden)
    monkeypatch.setattr(erasekit.attacks, "run_attack", forbidden)
    run_bench(BenchConfig(**TINY), out, progress=False)
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == results["rows"]

    # a changed budget recomputes that attack only, from scratch (its old per-prompt files are not resumed)
    calls = []
    monkeypatch.setattr(erasekit.attacks, "run_attack", lambda *a, **k: calls.append(k) or {"success_rate": 0.5, "n": 2, "budget": {}, "seed": 0})
    changed = BenchConfig(**{**TINY, "attack_budgets": {"paraphrase": {"prompts": 1, "samples": 2}}})
    run_bench(changed, out, progress=False)
    assert [c["attack"] for c in calls] == ["paraphrase"] and calls[0]["budget"] == {"prompts": 1, "samples": 2}
    assert not (out / "attacks" / "uce-triangle" / "paraphrase" / "result.json").exists()
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["uce"]["attacks"]["paraphrase"]["success_rate"] == 0.5
    # a lost cache entry recomputes that unit only
    (out / "attacks" / "uce-triangle" / "paraphrase.json").unlink()
    run_bench(changed, out, progress=False)
    assert len(calls) == 2


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    from erasekit.demo import run_demo

    index = run_demo(tmp_path / "demo", quick=True)
    assert index.is_file()
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {r["method"] for r in results["rows"]} == {"original", *ALL_METHODS}
    assert str(index.resolve()) in capsys.readouterr().out


# -------------------------------------------------------- a real browser
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when absent (the tests run as root), else the test is skipped."""
    if not Path(CHROMIUM).is_file() and shutil.which("apt-get"):
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        for command in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            if Path(CHROMIUM).is_file():
                break
            try:
                subprocess.run(command, capture_output=True, timeout=900, env=env)
            except (OSError, subprocess.TimeoutExpired):
                break
    if not Path(CHROMIUM).is_file():
        pytest.skip("headless Chromium is not installed and 'apt-get install -y chromium' failed; install Debian's chromium to run this test")
    return CHROMIUM


def _chromium(binary: str, *args: str) -> str:
    command = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--allow-file-access-from-files", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def test_html_report_in_headless_chromium(chromium, synthetic_report):
    out = synthetic_report
    dom = _chromium(chromium, "--dump-dom", (out / "index.html").resolve().as_uri())
    assert dom.count("<table") == 6 and dom.count("<img") == 8 and "Robustness: stripes" in dom
    # every image loads: a copy of the page reports each image's natural width once the page has loaded
    probe = out / "probe.html"
    probe.write_text((out / "index.html").read_text().replace("</body>", """<script>
window.addEventListener("load", () => {
  const widths = Array.from(document.images, image => image.complete ? image.naturalWidth : 0);
  document.body.setAttribute("data-widths", widths.join(","));
});
</script></body>"""))
    dom = _chromium(chromium, "--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri())
    widths = [int(w) for w in re.search(r'data-widths="([^"]*)"', dom).group(1).split(",")]
    assert len(widths) == 8 and all(w > 0 for w in widths), widths
    screenshot = out / "screenshot.png"
    _chromium(chromium, f"--screenshot={screenshot}", "--window-size=1200,2000", (out / "index.html").resolve().as_uri())
    with Image.open(screenshot) as picture:
        assert picture.size == (1200, 2000) and len(picture.getcolors(1 << 16) or range(300)) > 10  # rendered, not blank


# ------------------------------------------------------------- a real model
def _real_bench(tmp_path: Path, tiny_sd_folder: Path, classifier) -> Path:
    """A TOML file beside its prompt files (relative paths): two Imagenette objects on the tiny SD pipeline."""
    (tmp_path / "prompts").mkdir(exist_ok=True)
    (tmp_path / "prompts" / "tench.txt").write_text("an image of tench\n")
    (tmp_path / "prompts" / "church.txt").write_text("an image of church\na church in a field\n")
    lines = [f'model = "{tiny_sd_folder}"', f'judge = "classifier:{classifier}"', 'methods = ["uce"]', 'concepts = ["tench", "church"]',
             'attacks = ["paraphrase"]', 'efficacy_prompts = { tench = "prompts/tench.txt", church = "prompts/church.txt" }',
             "samples_per_prompt = 2", "grid_seeds = 1", "steps = 2", "[attack_budgets.paraphrase]", "prompts = 1", "samples = 1",
             "inference_steps = 2"]
    path = tmp_path / "real.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def church_classifier(tmp_path_factory) -> Path:
    """The tiny classifier of test_judges: whatever the image, 'church' wins (top-1), 'tabby' is second."""
    from test_judges import build_classifier

    return build_classifier(tmp_path_factory.mktemp("church"), bias=[0.0, 3.0, 6.0, 0.0])


def test_bench_on_a_real_model_with_a_judge(tmp_path, tiny_sd_folder, church_classifier, capsys, monkeypatch):
    shutil.copytree(church_classifier, tmp_path / "resnet")
    config_path = _real_bench(tmp_path, tiny_sd_folder, "resnet")  # relative to the TOML file
    out = tmp_path / "report"
    assert main(["bench", "--config", str(config_path), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["name"] == "imagenette-top1" and results["judge"]["spec"] == f"classifier:{tmp_path / 'resnet'}"
    assert results["concepts"] == [{"name": "tench", "attribute": "object", "erase_text": "tench"},
                                   {"name": "church", "attribute": "object", "erase_text": "church"}]
    rows = {(r["method"], r["concept"]): r for r in results["rows"]}
    assert set(rows) == {("original", "tench"), ("uce", "tench"), ("original", "church"), ("uce", "church")}
    for method in ("original", "uce"):  # the classifier sees a church in every image, erased or not
        church, tench = rows[(method, "church")], rows[(method, "tench")]
        assert church["erased_accuracy"] == 1.0 and tench["erased_accuracy"] == 0.0
        assert church["counts"]["erased"]["n"] == 4 and tench["counts"]["erased"]["n"] == 2  # prompts x samples
        assert church["counts"]["erased"]["ci95"][0] == pytest.approx(0.5101, abs=1e-3)
        assert tench["other_accuracy"] == 1.0 and tench["counts"]["other"]["n"] == 4  # the church prompts
        assert church["other_accuracy"] == 0.0 and church["counts"]["other"]["n"] == 2  # the tench prompt
        assert church["held_out_accuracy"] is None and church["toy_fid"] is None
    attack = rows[("uce", "church")]["attacks"]["paraphrase"]
    assert attack["success_rate"] == 1.0 and attack["n"] == 1 and attack["ci95"][1] == 1.0
    attack_result = json.loads((out / attack["result"]).read_text())
    assert attack_result["per_prompt"][0]["prompt"] == "an image of church"  # the efficacy prompts, the bench's judge
    assert attack_result["judge"]["labels"] == [[2, "church, church building"]]
    assert rows[("uce", "tench")]["attacks"]["paraphrase"]["success_rate"] == 0.0
    evaluation = json.loads((out / rows[("uce", "tench")]["evaluation"]).read_text())
    assert [r["prompt"] for r in evaluation["details"]["locality"]] == ["an image of church", "a church in a field"]
    assert evaluation["judge"]["labels"] == [[0, "tench, Tinca tinca"]]
    erasure = erasekit.Erasure.load(out / "erasures" / "uce-church.safetensors")
    assert erasure.info["bench_settings"]["kind"] == "object"
    markdown = (out / "report.md").read_text()
    efficacy = [row for row in _markdown_table(markdown, "Efficacy") if row[0] == "uce"][0]
    assert [cell.split(" ")[0] for cell in efficacy[1:]] == ["0%", "100%"]  # tench, church (with their image counts)
    assert '"judge": {' in markdown and (out / "images" / "uce-church.png").is_file()
    assert "report:" in capsys.readouterr().out

    # a rerun recomputes nothing
    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed a cached unit")

    monkeypatch.setattr(erasekit.bench, "evaluate_with_judge", forbidden)
    monkeypatch.setattr(erasekit.attacks, "run_attack", forbidden)
    monkeypatch.setattr(erasekit.resolve, "erase", forbidden)
    run_bench(load_bench_config(config_path), out, progress=False)
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    # another judge (--judge replaces the config's) recomputes every evaluation and attack, and no erasure
    shutil.copytree(church_classifier, tmp_path / "other")
    calls = []
    monkeypatch.setattr(erasekit.bench, "evaluate_with_judge", lambda *a, **k: calls.append("evaluate") or {"erased_accuracy": 0.5, "other_accuracy": 0.75})
    monkeypatch.setattr(erasekit.attacks, "run_attack", lambda *a, **k: calls.append(k["judge"].spec) or {"success_rate": 0.25, "n": 4})
    assert main(["bench", "--config", str(config_path), "--out", str(out), "--judge", f"classifier:{tmp_path / 'other'}"]) == 0
    assert calls.count("evaluate") == 4 and calls.count(f"classifier:{tmp_path / 'other'}") == 2
    rows = {(r["method"], r["concept"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows[("uce", "tench")]["erased_accuracy"] == 0.5 and rows[("uce", "tench")]["attacks"]["paraphrase"]["success_rate"] == 0.25


@pytest.mark.parametrize("extra, message", [
    ({"judge": ""}, "needs a judge for 'tench': set judge = \"classifier:PATH\""),
    ({"judge": "toy"}, "judges the toy world's pictures only"),
    ({"judge": "classifier:nowhere"}, "judge = 'classifier:nowhere': image classifier folder nowhere does not exist"),
    ({"kinds": {"dog": "object"}}, "kinds has 'dog', which is not in concepts"),
    ({"kinds": {"tench": "fish"}}, "unknown --kind 'fish'"),
    ({"judge_labels": {"tench": "trout"}}, "'trout' is not a class of the classifier"),
    ({"judge_threshold": 0.5}, "--judge-threshold does not apply to the classifier judge"),
    ({"attack_prompts": {"church": "missing.txt"}}, "attack_prompts.church: prompt file missing.txt does not exist"),
    ({"locality_prompts": "prompts/other.txt"}, "locality_prompts: prompt 2 of .*'a red bus'.* names no concept"),
    ({"dtype": "int8"}, "dtype = 'int8'"),
    ({"steps": "many"}, "steps is a whole number"),
])
def test_real_bench_config_errors_are_one_line_before_any_work(tmp_path, tiny_sd_folder, church_classifier, capsys, monkeypatch,
                                                               extra, message):
    import erasekit.models.loading

    monkeypatch.setattr(erasekit.models.loading, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    path = _real_bench(tmp_path, tiny_sd_folder, church_classifier)
    kept = [line for line in path.read_text().splitlines() if line.split(" =")[0] not in extra]  # the keys replaced

    def value(v):
        return "{ " + ", ".join(f"{k} = {json.dumps(x)}" for k, x in v.items()) + " }" if isinstance(v, dict) else json.dumps(v)

    path.write_text("\n".join([f"{key} = {value(v)}" for key, v in extra.items()] + kept) + "\n")
    (tmp_path / "prompts" / "other.txt").write_text("a church at dusk\na red bus\n")
    _refused_in_one_line(path, tmp_path / "out", message, capsys)


def test_real_model_keys_are_refused_on_the_toy_model(tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text('methods = ["uce"]\nconcepts = ["triangle"]\njudge = "clip:./clip"\n')
    with pytest.raises(ErasekitError, match="judge applies to real models; on the toy model the toy protocol judges"):
        load_bench_config(path)
    path.write_text('methods = ["uce"]\nconcepts = ["triangle"]\njudge = "toy"\n')
    assert load_bench_config(path).judge == "toy"
