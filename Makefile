# Two entry points (see README): `make demo` and `make test`. Each makes its own
# virtual environment and installs what it needs, so both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-solar-edge

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[export,tflite,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check solar_edge exporters runtime devices tests bench scripts
	$(VENV)/bin/mypy solar_edge exporters runtime devices

clean:
	rm -rf $(VENV) out artifacts
