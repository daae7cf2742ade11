"""Torch-free runtimes: the numpy sampler loop, onnxruntime and TensorRT (with cuda-python
buffers), the backend table and the bundle loader. Importing this package imports accel.core,
numpy and nothing heavier; an engine library is imported when an engine of its backend opens (a
test checks this in a fresh interpreter). Torch runtimes (eager, AOTInductor) live with the torch
code, in ``export.torch_runtime``."""

from accel.runtime.backends import BACKENDS, Backend, backend, installed_versions, open_backend
from accel.runtime.bundle import Bundle, bundle_mismatch
from accel.runtime.engine import artifact_kind, open_engine, open_runtime
from accel.runtime.loop import (
    Conditioning,
    Runtime,
    as_conditioning,
    draw,
    fused_feeds,
    infer_in_chunks,
    run_pipeline,
    sample,
    step_feeds,
)
from accel.runtime.ort import OrtRuntime

__all__ = [
    "BACKENDS",
    "Backend",
    "Bundle",
    "Conditioning",
    "OrtRuntime",
    "Runtime",
    "as_conditioning",
    "draw",
    "backend",
    "bundle_mismatch",
    "fused_feeds",
    "infer_in_chunks",
    "installed_versions",
    "open_backend",
    "open_engine",
    "open_runtime",
    "artifact_kind",
    "run_pipeline",
    "sample",
    "step_feeds",
]
