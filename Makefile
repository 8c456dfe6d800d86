# The two commands of the README. Both set up .venv on a fresh clone first.
# torch is installed on its own first: the CPU build served here, or the one a GPU user already has in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.erasekit-installed

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/erasekit demo

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_uce_rece.py

clean:
	rm -rf demo-output .pytest_cache
