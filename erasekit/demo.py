"""``erasekit demo``: the guided tour on the bundled toy model, offline, on a CPU.

It runs the benchmark machinery (:mod:`erasekit.bench`) with the bundled demo config
(``erasekit/data/bench_demo.toml``): erase one shape ("triangle") with each of the five methods
(their ``toy`` presets), measure with the toy classifier how often the erased shape and the other
shapes are still drawn (on the training names and on held-out paraphrases), attack each erasure
with ``paraphrase`` and ``soft-prompt`` at a small budget, and write ``OUT/index.html`` and
``OUT/report.md``. Interrupted, it resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from erasekit.bench import DEMO_CONFIG, load_bench_config, run_bench


def run_demo(out: str | Path = "demo-output", quick: bool = False) -> Path:
    """Run the demo into ``out``; returns the path of the HTML report."""
    config = load_bench_config(DEMO_CONFIG, quick=quick)
    concepts = ", ".join(repr(c) for c in config.concepts)
    print(f"erasekit demo: erase {concepts} from the bundled toy model with {', '.join(config.methods)}; "
          f"evaluate; attack with {', '.join(config.attacks)}; write the report to {Path(out)}/ "
          f"({'quick settings' if quick else 'under 10 minutes on 2 free CPU cores'}; rerun to resume)", flush=True)
    index = run_bench(config, out)
    print(f"\nreport: {index.resolve()}\n        {(index.parent / 'report.md').resolve()}")
    return index


if __name__ == "__main__":
    run_demo()
