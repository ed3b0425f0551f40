# One command runs the main job (make demo), one runs the tests (make test).
# Each bootstraps .venv from nothing but python3 and pip.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
PACKAGES := libs/cdp-proto libs/cdp-kit libs/cdp-standins services/ingest services/identity services/segmentation services/activation cli
PYPROJECTS := $(addsuffix /pyproject.toml,$(PACKAGES))
HANDWRITTEN := libs/cdp-kit/src libs/cdp-standins/src services/ingest/src services/identity/src services/segmentation/src services/activation/src cli/src scripts tests bench

.PHONY: venv demo test lint typecheck gen gen-check pytest bench clean fmt

$(STAMP): $(PYPROJECTS) requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(addprefix -e ,$(filter-out libs/cdp-kit,$(PACKAGES))) -e 'libs/cdp-kit[testing]' -r requirements-dev.txt
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/cdp demo

gen: $(STAMP)
	$(PY) scripts/gen_protos.py
	$(PY) scripts/gen_yaml_docs.py

gen-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check
	$(PY) scripts/gen_yaml_docs.py --check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy $(HANDWRITTEN)

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck gen-check pytest

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .cdp
