# Everything runs from a local virtualenv that `make install` creates from nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8001
# `make run BACKENDS=http://10.0.0.7:8000,http://10.0.0.8:8000 MODELS=llama,llama`;
# with no BACKENDS the router starts in front of two built-in demo engines.
BACKENDS ?=
MODELS ?=
ARGS ?=

.PHONY: install run test test-slow chaos lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/python -m router --port $(PORT) \
		$(if $(BACKENDS),--static-backends '$(BACKENDS)' --static-models '$(MODELS)',--demo) $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(ARGS)

chaos: install
	$(BIN)/python -m pytest -m chaos tests/chaos tests/test_fuzz_parsing.py $(ARGS)

lint: install
	$(BIN)/python -m flake8 router tests bench
	$(BIN)/python -m mypy

bench: install
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
