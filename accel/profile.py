"""The latency harness: warm-up, a fixed iteration count, percentiles, and the environment.

Several workloads measured in one run are interleaved (one call of each per round, after each has
warmed up), so that drift of a shared machine hits them alike and their ratios stay meaningful.
Timing is host wall-clock with ``perf_counter_ns`` around calls that return host arrays, which is
what a CPU deployment sees. No torch at import.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from importlib import metadata

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(times_ms: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99 (linear interpolation, numpy's default), min, max, mean, std and n."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timings to summarize")
    out = {f"p{p}": float(np.percentile(t, p)) for p in PERCENTILES}
    out.update(
        min=float(t.min()),
        max=float(t.max()),
        mean=float(t.mean()),
        std=float(t.std(ddof=1)) if t.size > 1 else 0.0,
        n=int(t.size),
    )
    return out


def measure_interleaved(
    workloads: dict[str, Callable[[], object]],
    warmup: int,
    iterations: int,
) -> dict[str, dict[str, float]]:
    """Warm each workload up ``warmup`` times, then time ``iterations`` rounds of one call each."""
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations}, {warmup}")
    for fn in workloads.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in workloads}
    for _ in range(iterations):
        for name, fn in workloads.items():
            start = time.perf_counter_ns()
            fn()
            times[name].append((time.perf_counter_ns() - start) / 1e6)
    return {name: dict(summarize(t), warmup=warmup) for name, t in times.items()}


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = value.split()
                if model and flags:
                    break
    except OSError:
        pass
    return model, flags


def environment(threads: int | None = None) -> dict:
    """Where a figure was measured: machine, CPU features that change kernels, library versions."""
    model, flags = _cpu_model_and_flags()
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")) or f == "f16c")
    versions = {}
    for pkg in ("accel", "torch", "diffusers", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": model,
        "cpu_flags": simd,
        "logical_cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }
