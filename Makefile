# Quickstart targets. Everything installs into .venv from pyproject.toml; nothing by hand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Simulated CPU devices, so that every sharding path runs on a laptop.
CPU_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: demo test test-fast lint docs format setup setup-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core-installed: pyproject.toml setup.py | $(VENV)/bin/python
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml setup.py | $(VENV)/bin/python
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@ $(VENV)/.core-installed

setup: $(VENV)/.core-installed
setup-test: $(VENV)/.test-installed

GPT_NEO := $(VENV)/bin/gpt-neo

demo: setup
	$(GPT_NEO) data demo
	$(GPT_NEO) check-data --model configs/demo.json --check_records 0
	$(CPU_DEVICES) $(GPT_NEO) summary --model configs/demo.json \
		--set mesh_shape=x:4,y:2 layout=batch:x,heads:y,vocab:y,intermediate_expanded:y
	$(GPT_NEO) train --model configs/demo.json --steps_per_checkpoint 50
	$(GPT_NEO) sample --model configs/demo.json --prompt data/demo_prompt.txt --max_new_tokens 64

test: setup-test
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 tests

# The quick loop: unit tests only, no processes, emulators, TPU compiles or slow compiles
# (tests/conftest.py guards the first two).
test-fast: setup-test
	GPT_NEO_TEST_FAST=1 $(PY) -m pytest -n 2 --dist worksteal --durations=15 \
		-m "not (process or emulator or tpu or slow)" tests

# The documentation site, into site/; --strict (mkdocs.yml): a broken link or a page missing
# from the nav fails the build
docs: setup-test
	$(PY) -m mkdocs build --strict

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright --pythonpath $(PY)

format: setup-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info site
