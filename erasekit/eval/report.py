"""The benchmark report: ``OUT/report.md``, ``OUT/index.html`` and ``OUT/plots/`` from ``OUT/results.json``.

:func:`write_report` reads only ``results.json`` and the image files it names, so a report can be
rewritten (``erasekit bench --report-only``) without running anything. The HTML page is one
self-contained file: inline CSS, no scripts, images by relative path.

``results.json`` (written by :func:`erasekit.bench.run_bench`) holds ``name``, ``model``, ``config``,
``protocol``, ``seeds``, ``versions``, ``methods``, ``concepts`` (``name``, ``attribute``),
``attacks``, ``timings`` and ``rows``: one per (method, concept), method ``"original"`` for the
unerased model, each with ``erased_accuracy``, ``other_accuracy``, ``held_out_accuracy``,
``toy_fid``, ``erase_seconds``, ``trainable_parameters``, ``attacks`` (name -> ``success_rate``,
``n``, ``budget``, ``seed``, ``seconds`` or ``error``) and ``image`` (the grid, relative to OUT).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from erasekit.errors import ErasekitError
from erasekit.utils import atomic_write, write_text

SCATTER = "plots/efficacy_vs_locality.png"
ATTACK_BARS = "plots/attack_success.png"
IMAGES_CAPTION = ("One row per value of the concept's attribute (the erased one among them), one column per seed; "
                  "the same seeds before and after.")


@dataclass
class Table:
    """One table of the report, rendered both as Markdown and as HTML."""

    title: str
    caption: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _rate(row: dict, key: str, value) -> str:
    """A percentage with its image count, "12% (3/25)", where the row keeps the counts."""
    counts = (row.get("counts") or {}).get(key)
    if value is None or not counts or not counts.get("n"):
        return _percent(value)
    return f"{_percent(counts['rate'])} ({counts['shown']}/{counts['n']})"


def undrawn_warnings(results: dict, floor: float = 0.5) -> list[str]:
    """Concepts the unerased model draws in under ``floor`` of the images asked for them: there, a low efficacy
    number says nothing about the erasure."""
    warnings = []
    for row in results.get("rows", []):
        rate = row.get("erased_accuracy")
        if row.get("method") == "original" and rate is not None and rate < floor:
            counts = (row.get("counts") or {}).get("erased") or {}
            shown = f" ({counts['shown']}/{counts['n']} images)" if counts.get("n") else ""
            warnings.append(f"WARNING: the unerased model draws {row['concept']!r} in only {_percent(rate)} of the images "
                            f"asked for it{shown}; efficacy on it cannot show an erasure (use more images, another seed, "
                            "or a concept the model draws)")
    return warnings


def _number(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _count(value) -> str:
    return "–" if value is None else f"{int(value):,}"


def read_results(out: str | Path) -> dict:
    path = Path(out) / "results.json"
    if not path.is_file():
        raise ErasekitError(f"{path} does not exist; run 'erasekit bench --out {out}' first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ErasekitError(f"{path} is not valid JSON ({error}); rerun 'erasekit bench' to rewrite it") from None
    for key in ("rows", "methods", "concepts"):
        if key not in results:
            raise ErasekitError(f"{path} has no {key!r}; it was not written by 'erasekit bench'")
    return results


def _lookup(results: dict) -> tuple[list[str], list[str], dict]:
    methods = [m for m in ["original", *results["methods"]] if any(r["method"] == m for r in results["rows"])]
    concepts = [c["name"] for c in results["concepts"]]
    by_key = {(r["method"], r["concept"]): r for r in results["rows"]}
    return methods, concepts, by_key


def build_tables(results: dict) -> list[Table]:
    """The report's tables, one per axis (robustness: one per concept)."""
    methods, concepts, rows = _lookup(results)

    def per_concept(title, caption, cell, notes=()):
        body = [[m, *(cell(rows.get((m, c))) if rows.get((m, c)) else "–" for c in concepts)] for m in methods]
        return Table(title, caption, ["method", *concepts], body, list(notes))

    tables = [
        per_concept("Efficacy", "How often the judge (on the toy model, the toy classifier) sees the erased concept in images "
                    "asked for it (lower is better; 'original' is the unerased model); (k/n): images judged to show it / images.",
                    lambda r: _rate(r, "erased", r.get("erased_accuracy")), undrawn_warnings(results)),
        per_concept("Locality", "Accuracy on the other values of the concept's attribute, e.g. the other shapes; on a real model, "
                    "on the other concepts' prompts (higher is better).", lambda r: _rate(r, "other", r.get("other_accuracy"))),
    ]
    attacks = list(results.get("attacks", []))
    for concept in concepts:
        body, notes = [], []
        for m in methods:
            r = rows.get((m, concept))
            if r is None:
                continue
            cells = [_rate(r, "held_out", r.get("held_out_accuracy"))]
            for attack in attacks:
                a = r.get("attacks", {}).get(attack)
                if a is not None and a.get("error"):
                    notes.append(f"{attack} on {m}: not run ({a['error']})")
                    cells.append(f"n/a [{len(notes)}]")
                else:
                    cells.append("–" if a is None else _percent(a.get("success_rate")) + (
                        f" ({round(a['success_rate'] * a['n'])}/{a['n']})" if a.get("n") and a.get("success_rate") is not None else ""))
            body.append([m, *cells])
        tables.append(Table(f"Robustness: {concept}", "Held-out paraphrases: how often the concept is drawn for prompts never "
                            "seen in training. Attacks: success rate (fraction of images where the judge sees the concept); "
                            "lower is better; – not run.", ["method", "held-out paraphrases", *attacks], body,
                            [f"[{i}] {note}" for i, note in enumerate(notes, 1)]))
    tables.append(per_concept("Fidelity", "Toy FID: Fréchet distance between toy-classifier features of generated and "
                              "procedurally drawn images (lower is better).", lambda r: _number(r.get("toy_fid"))))
    body = []
    for m in methods:
        if m == "original":
            continue
        for c in concepts:
            r = rows.get((m, c))
            if r is not None:
                body.append([m, c, _number(r.get("erase_seconds"), 1), _number(r.get("erase_cpu_seconds"), 1),
                             _count(r.get("trainable_parameters"))])
    tables.append(Table("Cost", "Seconds to erase (wall clock and CPU time of the process, as measured when the erasure was made) "
                        "and the number of trainable values in the erasure (weight deltas or added modules).",
                        ["method", "concept", "seconds", "CPU seconds", "trainable parameters"], body))
    return tables


# ------------------------------------------------------------------- plots
def write_plots(results: dict, out: Path) -> list[str]:
    """Efficacy-vs-locality scatter and attack success bars; returns the written paths (relative to out)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    methods, concepts, rows = _lookup(results)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written = []
    markers = "osD^vP*X"
    colors = plt.get_cmap("tab10")

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for i, m in enumerate(methods):
        points = [(rows[(m, c)].get("erased_accuracy"), rows[(m, c)].get("other_accuracy"), c) for c in concepts if (m, c) in rows]
        points = [p for p in points if p[0] is not None and p[1] is not None]
        if not points:
            continue
        axis.scatter([p[0] for p in points], [p[1] for p in points], label=m, marker=markers[i % len(markers)], color=colors(i % 10), s=60)
        for x, y, c in points:
            axis.annotate(c, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    axis.set_xlabel("erased concept still drawn (efficacy: lower is better)")
    axis.set_ylabel("other values drawn correctly (locality: higher is better)")
    axis.set_xlim(-0.05, 1.05)
    axis.set_ylim(-0.05, 1.05)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save_figure(figure, out / SCATTER)
    plt.close(figure)
    written.append(SCATTER)

    attacks = list(results.get("attacks", []))
    methods = [m for m in methods if any(rows.get((m, c), {}).get("attacks") for c in concepts)]  # the attacked ones
    if attacks and methods:
        width_per_concept = 2 + 0.5 * len(methods) * len(attacks) ** 0.5
        figure, axes = plt.subplots(1, len(concepts), figsize=(min(18, len(concepts) * width_per_concept), 4), squeeze=False)
        width = 0.8 / len(attacks)
        for axis, concept in zip(axes[0], concepts):
            for j, attack in enumerate(attacks):
                heights = []
                for m in methods:
                    a = rows.get((m, concept), {}).get("attacks", {}).get(attack) or {}
                    heights.append(a.get("success_rate") or 0.0)
                axis.bar([i + (j - (len(attacks) - 1) / 2) * width for i in range(len(methods))], heights, width, label=attack, color=colors(j % 10))
            axis.set_xticks(range(len(methods)), methods, rotation=30, fontsize=8)
            axis.set_ylim(0, 1.05)
            axis.set_title(concept)
            axis.set_ylabel("attack success rate")
            axis.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        figure.tight_layout()
        _save_figure(figure, out / ATTACK_BARS)
        plt.close(figure)
        written.append(ATTACK_BARS)
    return written


def _save_figure(figure, path: Path) -> None:
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110))  # the format follows the suffix, which tmp keeps


# ---------------------------------------------------------------- rendering
def _images(results: dict, out: Path) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Per concept: (label, image path relative to out, or None when the file is missing)."""
    methods, concepts, rows = _lookup(results)
    sections = []
    for c in concepts:
        items = []
        for m in methods:
            r = rows.get((m, c))
            if r is None or not r.get("image"):
                continue
            label = "before (original)" if m == "original" else f"after {m}"
            items.append((label, r["image"] if (out / r["image"]).is_file() else None))
        sections.append((c, items))
    return sections


def _timing_lines(results: dict) -> list[str]:
    """'stage: wall s (CPU s)' per stage, as measured when each unit was first computed."""
    timings = results.get("timings") or {}
    wall, cpu = timings.get("seconds"), timings.get("cpu_seconds") or {}
    if not wall:
        return []

    def item(label, w, c):
        return f"{label} {w:.0f}s" + (f" ({c:.0f}s CPU)" if c is not None else "")

    lines = [item("load", wall.get("load", 0), cpu.get("load"))]
    lines += [item(f"erase with {m}", s, cpu.get("erase", {}).get(m)) for m, s in wall.get("erase", {}).items()]
    lines += [item("evaluate", wall.get("evaluate", 0), cpu.get("evaluate")), item("grids", wall.get("grids", 0), cpu.get("grids"))]
    lines += [item(f"attack {a}", s, cpu.get("attacks", {}).get(a)) for a, s in wall.get("attacks", {}).items()]
    lines.append(item("total", wall.get("total", 0), cpu.get("total")))
    return lines


def _provenance(results: dict) -> dict:
    """The protocol, the judge (real models), the seeds and the versions, as the report prints them."""
    keys = ("protocol", "judge", "seeds", "versions") if results.get("judge") else ("protocol", "seeds", "versions")
    return {k: results.get(k) for k in keys}


def render_markdown(results: dict, tables: list[Table], plots: list[str], images) -> str:
    lines = [f"# {results.get('name', 'erasekit benchmark')}", "",
             f"Model: `{results.get('model')}`. Methods: {', '.join(results['methods'])}. "
             f"Concepts: {', '.join(c['name'] for c in results['concepts'])}. Attacks: {', '.join(results.get('attacks', [])) or 'none'}.", ""]
    lines += [f"> **{warning}**\n" for warning in undrawn_warnings(results)]
    for table in tables:
        lines += [f"## {table.title}", "", table.caption, "", "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
        lines += ["| " + " | ".join(row) + " |" for row in table.rows]
        lines.append("")
        if table.notes:
            lines += [f"- {note}" for note in table.notes] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})\n" for p in plots]
    lines += ["## Images", "", IMAGES_CAPTION, ""]
    for concept, items in images:
        lines += [f"### {concept}", ""]
        lines += [f"{label}:\n\n![{label}]({path})\n" if path else f"{label}: (image missing)\n" for label, path in items]
    lines += ["## Protocol, seeds and versions", "", "```json",
              json.dumps(_provenance(results), indent=2), "```", ""]
    timing = _timing_lines(results)
    if timing:
        lines += ["Time per stage: " + ", ".join(timing) + ".", ""]
    return "\n".join(lines)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; font-size: 1.3em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: .3em .8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
p.caption { color: #555; font-size: .92em; margin: .2em 0; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure.grid { max-width: 48%; }
figure img { max-width: 100%; border: 1px solid #ddd; image-rendering: pixelated; }
figcaption { font-size: .9em; color: #444; }
ul.notes { font-size: .85em; color: #555; margin-top: -.4em; }
p.warning { background: #fff3cd; border-left: 4px solid #d9822b; padding: .5em .8em; }
pre { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: .85em; }
"""


def render_html(results: dict, tables: list[Table], plots: list[str], images) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(results.get('name', 'erasekit benchmark'))}</title>", f"<style>{CSS}</style></head><body>",
             f"<h1>{e(results.get('name', 'erasekit benchmark'))}</h1>",
             f"<p>Model: <code>{e(str(results.get('model')))}</code>. Methods: {e(', '.join(results['methods']))}. "
             f"Concepts: {e(', '.join(c['name'] for c in results['concepts']))}. "
             f"Attacks: {e(', '.join(results.get('attacks', [])) or 'none')}.</p>"]
    parts += [f'<p class="warning" role="alert"><strong>{e(warning)}</strong></p>' for warning in undrawn_warnings(results)]
    for table in tables:
        slug = "table-" + "".join(ch if ch.isalnum() else "-" for ch in table.title.lower())
        parts += [f'<h2 id="{slug}">{e(table.title)}</h2>', f'<p class="caption">{e(table.caption)}</p>', f'<table aria-label="{e(table.title)}">',
                  "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in table.header) + "</tr></thead><tbody>"]
        parts += ["<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>" for row in table.rows]
        parts.append("</tbody></table>")
        if table.notes:
            parts.append('<ul class="notes">' + "".join(f"<li>{e(note)}</li>" for note in table.notes) + "</ul>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for plot in plots:
            title = Path(plot).stem.replace("_", " ")
            parts.append(f'<figure><img src="{e(plot)}" alt="{e(title)}"><figcaption>{e(title)}</figcaption></figure>')
    parts += ["<h2>Images</h2>", f'<p class="caption">{e(IMAGES_CAPTION)}</p>']
    for concept, items in images:
        parts.append(f"<h3>{e(concept)}</h3>")
        for label, path in items:
            if path:
                parts.append(f'<figure class="grid"><img src="{e(path)}" alt="{e(label)}"><figcaption>{e(label)}</figcaption></figure>')
            else:
                parts.append(f"<p>{e(label)}: image missing</p>")
    parts += ["<h2>Protocol, seeds and versions</h2>",
              f"<pre>{e(json.dumps(_provenance(results), indent=2))}</pre>"]
    timing = _timing_lines(results)
    if timing:
        parts.append(f"<p>Time per stage: {e(', '.join(timing))}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(out: str | Path) -> Path:
    """Write OUT/report.md, OUT/index.html and OUT/plots/*.png from OUT/results.json; returns index.html."""
    out = Path(out)
    results = read_results(out)
    tables = build_tables(results)
    plots = write_plots(results, out)
    images = _images(results, out)
    write_text(out / "report.md", render_markdown(results, tables, plots, images))
    write_text(out / "index.html", render_html(results, tables, plots, images))
    return out / "index.html"
