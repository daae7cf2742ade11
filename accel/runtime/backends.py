"""The engine backends' rows (``accel.registry.BACKENDS``: the runtime class that opens its engines,
the library that builds and runs them (its PyPI names and version rule), whether one runtime serves
concurrent calls, and how Triton serves it), looked up and opened. ``open_engine``, ``Bundle``, the
bundle stage, the bundle checks and ``accel deploy triton`` all read that table; adding a backend
adds a row there, its runtime and its compile stage."""

from __future__ import annotations

from pathlib import Path

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError
from accel.core.hardware import installed_version
from accel.registry import BACKENDS, Backend, backend_name, resolve

__all__ = ["BACKENDS", "Backend", "backend", "installed_versions", "open_backend"]


def backend(name: str | None) -> Backend:
    """The row of backend ``name`` (or the name a bundle written before accel.engine/2 gave it)."""
    known = backend_name(name) if isinstance(name, str) else None
    if known is None:
        raise CheckpointError(
            f"unknown engine backend {name!r}; accel runs {', '.join(BACKENDS)} engines"
        )
    return BACKENDS[known]


def installed_versions() -> dict[str, str | None]:
    """Versions of every backend's library installed here, read without importing them."""
    return {b.library: installed_version(*b.distributions) for b in BACKENDS.values()}


def open_backend(file: Path, info: EngineInfo, spin: bool = True):
    """The runtime of the engine ``file`` described by ``info``, from its backend's row."""
    return resolve(backend(info.backend).runtime).from_engine(file, info, spin)
