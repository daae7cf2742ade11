# Each target bootstraps its own virtualenv in .venv from the repo's own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow venv clean

$(BIN)/accel: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# TensorRT's type stubs, to type-check export/tensorrt_compile.py (tests/test_tensorrt.py).
	# Kept out of site-packages: there they would make `import tensorrt` an empty namespace
	# package that Model Optimizer mistakes for TensorRT. --no-deps: they require the real
	# tensorrt wheels, which only NVIDIA's package index serves.
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/tensorrt-stubs tensorrt-stubs==10.13.0.35.1
	# Triton's model-config schema (tritonclient's model_config_pb2), to validate the
	# config.pbtxt files `accel deploy triton` writes (tests/test_bundle.py). Apart too: its grpc
	# extra pins protobuf<7 and ml-dtypes<=0.5.4 against onnx's.
	$(BIN)/pip install --quiet --no-deps --target $(VENV)/tritonclient tritonclient==2.73.0
	touch $(BIN)/accel

venv: $(BIN)/accel

demo: venv
	$(BIN)/accel demo --out demo-out

test: venv
	$(BIN)/python -m pytest -q

# The heavy tests `test` leaves out (AOTInductor builds, torchrun launches, long trainings).
test-slow: venv
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) demo-out
