"""The engine backends, one row each: the runtime class that opens its engines, the library that
builds and runs them (its PyPI names and version rule), whether one runtime serves concurrent
calls, and how Triton serves it. ``open_engine``, ``Bundle``, the bundle stage, the bundle checks
and ``accel deploy triton`` all read this table; adding a backend adds a row here, its runtime and
its compile stage."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError
from accel.core.hardware import installed_version


@dataclass(frozen=True)
class Backend:
    name: str  # an engine's info["backend"]
    runtime: str  # "module:Class" with a from_engine(file, info, spin) classmethod
    library: str  # the library that builds and runs its engines (manifest "libraries" key)
    distributions: tuple[str, ...]  # the PyPI names that library installs as
    exact_version: bool  # engines run only under the version that built them (unless
    # built version-compatible); otherwise any later minor of the same major
    concurrent: bool  # one runtime serves concurrent calls; else calls are serialised
    triton: str | None  # Triton's backend / platform for it; None: Triton cannot serve it
    suffix: str  # engine file suffix in a Triton repository


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("onnxruntime", "accel.runtime.ort:OrtRuntime", "onnxruntime",
                ("onnxruntime", "onnxruntime-gpu"), False, True, "onnxruntime", ".onnx"),
        Backend("tensorrt", "accel.runtime.tensorrt:TensorRTRuntime", "tensorrt",
                ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"), True, False, "tensorrt_plan",
                ".plan"),
        Backend("aotinductor", "export.torch_runtime:AotiRuntime", "torch", ("torch",), True,
                False, None, ".pt2"),
        # a folder (the checkpoint) compiled in-process: no bundle, no Triton (export.torch_compile)
        Backend("torch-compiled", "export.torch_compile:TorchEngineRuntime", "torch", ("torch",),
                True, False, None, ""),
    )
}  # fmt: skip


def backend(name: str | None) -> Backend:
    if name not in BACKENDS:
        raise CheckpointError(
            f"unknown engine backend {name!r}; accel runs {', '.join(BACKENDS)} engines"
        )
    return BACKENDS[name]


def installed_versions() -> dict[str, str | None]:
    """Versions of every backend's library installed here, read without importing them."""
    return {b.library: installed_version(*b.distributions) for b in BACKENDS.values()}


def open_backend(file: Path, info: EngineInfo, spin: bool = True):
    """The runtime of the engine ``file`` described by ``info``, from its backend's row."""
    module, cls = backend(info.backend).runtime.split(":")
    return getattr(importlib.import_module(module), cls).from_engine(file, info, spin)
