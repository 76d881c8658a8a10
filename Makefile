# Two commands do all set-up on a fresh machine:
#   make demo  - the main job on the embedded default data (CPU is enough)
#   make test  - create .venv, install everything, run the suite
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# CPU-only machines get the CPU build of torch (from the local wheel cache when present);
# machines with an NVIDIA driver keep/choose the user's CUDA build.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_CUDA),torch,torch==2.13.0)

.PHONY: setup test demo bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VPY) -m pytest -q -x --timeout=900 --durations=15

demo: setup
	$(VPY) scripts/demo.py --out demo_out

bench: setup
	$(VPY) bench/bench_wkv.py
	$(VPY) bench/bench_model.py
	$(VPY) bench/bench_peft.py
	$(VPY) bench/bench_tokenize.py

clean:
	rm -rf $(VENV) demo_out
