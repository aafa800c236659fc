# Two entry points (see README): `make demo` and `make test`. Each makes its own
# virtual environment and installs what it needs, so both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-solar-edge

.PHONY: demo demo-lm test test-convert lint clean board-check

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[export,tflite,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# decoder task switch (docs/decoder.md): pretrains and caches under artifacts/lm the first time
demo-lm: $(STAMP)
	$(PY) scripts/demo_lm.py

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

# The TFLite converter (extra `convert`: litert-torch, jax; ~0.75 GiB, ~2.5 min to install)
# in a venv of its own, so `make test` keeps checking the converter-missing path; CI runs both.
CONVERT_VENV ?= .venv-convert
CONVERT_STAMP := $(CONVERT_VENV)/.installed-solar-edge

$(CONVERT_STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(CONVERT_VENV)
	$(CONVERT_VENV)/bin/python -m pip install -q --upgrade pip
	$(CONVERT_VENV)/bin/python -m pip install -q -c constraints.txt -e '.[export,tflite,dev,convert]'
	touch $(CONVERT_STAMP)

test-convert: $(CONVERT_STAMP)
	$(CONVERT_VENV)/bin/python -c "import litert_torch, ai_edge_litert.interpreter"  # never a silent skip
	$(CONVERT_VENV)/bin/python -m pytest -rs -q tests/test_runtime_tflite.py tests/test_export.py -k tflite

# aarch64 board check under qemu-user (root; docs/board-check.md); not part of `make test`
board-check: $(STAMP)
	HOST_PYTHON=$(PY) scripts/check_aarch64.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check solar_edge exporters runtime devices tests bench scripts
	$(VENV)/bin/mypy solar_edge exporters runtime devices

clean:
	rm -rf $(VENV) $(CONVERT_VENV) out artifacts
