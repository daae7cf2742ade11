# Each target bootstraps its own virtualenv in .venv from the repo's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

$(BIN)/accel: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/accel

venv: $(BIN)/accel

demo: venv
	$(BIN)/accel demo --out demo-out

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out
