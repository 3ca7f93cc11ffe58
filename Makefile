PY ?= .venv/bin/python

.PHONY: install test test-fast test-gpu lint format demo clean

install:            ## create .venv and install the project with every extra
	python3 -m venv .venv
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e ".[torch,client,service,experiments,dev,data]"

test:               ## the full test suite (the README's test command): two processes, whole files each
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast:          ## tests that need no services
	$(PY) -m pytest -q -m "not services and not slow"

test-gpu:           ## GPU-only tests (on a machine with CUDA)
	$(PY) -m pytest -q -m gpu

lint:
	$(PY) -m ruff check .

format:
	$(PY) -m ruff format disp tests benchmarks
	$(PY) -m ruff check --fix .

demo:               ## the README's main command
	$(PY) -m disp.cli demo

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
