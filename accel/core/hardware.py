"""What this machine is: CPU model and instruction-set flags, GPUs through NVML (nvidia-ml-py) when
a driver is present, a Jetson's model from the device tree; and which target in profiles/ fits it.

No torch here: `accel targets detect` and the report's environment must work where only the
engine's runtime is installed. NVML readings that a driver does not support are left out, never
guessed.
"""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any

SIMD_PREFIXES = ("avx", "amx", "fma", "sse4", "f16c")
LIBRARIES = (
    "accel",
    "numpy",
    "torch",
    "diffusers",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "tensorrt",
    "nvidia-ml-py",
)


def installed_version(*dists: str) -> str | None:
    """The installed version of the first of ``dists`` that is installed, read from package
    metadata without importing it; None if none is."""
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def cpu_info() -> dict[str, Any]:
    """Model name, all /proc/cpuinfo flags, logical cores and the cores this process may use."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):  # x86, Arm
                    flags = value.split()
                if model and flags:
                    break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "model": model,
        "flags": flags,
        "logical_cores": os.cpu_count(),
        "affinity_cores": affinity,
    }


def jetson_model() -> str | None:
    """'NVIDIA Jetson AGX Orin Developer Kit' on a Jetson (NVML does not run there), else None."""
    try:
        text = Path("/proc/device-tree/model").read_bytes().decode(errors="replace")
    except OSError:
        return None
    text = text.strip("\x00 \n")
    return text if "jetson" in text.lower() or "orin" in text.lower() else None


def names_gpu(pattern: str, name: str) -> bool:
    """Whether ``pattern`` (a target's ``gpu``) names the GPU called ``name``: a whole-word,
    case-insensitive match, so "L4" is not an "L40S" and "H200" is not a "GH200"."""
    return re.search(rf"(?<![a-z0-9]){re.escape(pattern)}(?![a-z0-9])", name, re.I) is not None


def _nvml_read(fn, *args):
    """One NVML reading, or None where the driver or device does not support it."""
    import pynvml

    try:
        return fn(*args)
    except pynvml.NVMLError:
        return None


def gpu_info() -> list[dict[str, Any]] | None:
    """Per GPU: name, compute capability, memory, driver, clocks, power and throttle reasons,
    read through NVML. None when nvidia-ml-py or a driver is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        gpus = []
        driver = _nvml_read(pynvml.nvmlSystemGetDriverVersion)
        for i in range(_nvml_read(pynvml.nvmlDeviceGetCount) or 0):
            h = _nvml_read(pynvml.nvmlDeviceGetHandleByIndex, i)
            name = _nvml_read(pynvml.nvmlDeviceGetName, h) if h is not None else None
            if name is None:
                continue
            cc = _nvml_read(pynvml.nvmlDeviceGetCudaComputeCapability, h)
            mem = _nvml_read(pynvml.nvmlDeviceGetMemoryInfo, h)
            power = _nvml_read(pynvml.nvmlDeviceGetPowerUsage, h)
            limit = _nvml_read(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
            reasons = _nvml_read(pynvml.nvmlDeviceGetCurrentClocksEventReasons, h)
            clocks = {
                kind: {
                    "current": _nvml_read(pynvml.nvmlDeviceGetClockInfo, h, const),
                    "max": _nvml_read(pynvml.nvmlDeviceGetMaxClockInfo, h, const),
                }
                for kind, const in (
                    ("sm_mhz", pynvml.NVML_CLOCK_SM),
                    ("memory_mhz", pynvml.NVML_CLOCK_MEM),
                )
            }
            gpus.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
                    "memory_total_mib": mem.total / 2**20 if mem else None,
                    "memory_used_mib": mem.used / 2**20 if mem else None,
                    "driver": driver.decode() if isinstance(driver, bytes) else driver,
                    "clocks": clocks,
                    "power_w": power / 1000 if power is not None else None,
                    "power_limit_w": limit / 1000 if limit is not None else None,
                    "throttle_reasons": throttle_reasons(reasons) if reasons is not None else None,
                    "temperature_c": _nvml_read(
                        pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU
                    ),
                }
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def nvml_memory_used_mib(uuid: str) -> float | None:
    """Memory in use on the GPU with this UUID, device-wide (every process, CUDA contexts
    included), as NVML reports it; None without NVML. By UUID because NVML numbers GPUs by PCI
    bus and ignores CUDA_VISIBLE_DEVICES, which CUDA's numbering follows."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # ImportError, or NVMLError without a driver
        return None
    try:
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def throttle_reasons(mask: int) -> list[str]:
    """NVML's clocks-event (throttle) bitmask as names; [] when the clocks run free."""
    import pynvml

    names = {
        "gpu_idle": "nvmlClocksEventReasonGpuIdle",
        "applications_clocks_setting": "nvmlClocksEventReasonApplicationsClocksSetting",
        "sw_power_cap": "nvmlClocksEventReasonSwPowerCap",
        "hw_slowdown": "nvmlClocksEventReasonHwSlowdown",
        "sync_boost": "nvmlClocksEventReasonSyncBoost",
        "sw_thermal_slowdown": "nvmlClocksEventReasonSwThermalSlowdown",
        "hw_thermal_slowdown": "nvmlClocksEventReasonHwThermalSlowdown",
        "hw_power_brake_slowdown": "nvmlClocksEventReasonHwPowerBrakeSlowdown",
        "display_clock_setting": "nvmlClocksEventReasonDisplayClockSetting",
    }
    return [name for name, const in names.items() if mask & getattr(pynvml, const, 0)]


def environment(threads: int | None = None, gpus: bool = True) -> dict[str, Any]:
    """Where a figure was measured: CPU (model, SIMD flags, cores, threads), GPUs through NVML,
    platform and library versions."""
    cpu = cpu_info()
    versions = {pkg: v for pkg in LIBRARIES if (v := installed_version(pkg))}
    return {
        "cpu": cpu["model"],
        "cpu_flags": sorted(f for f in cpu["flags"] if f.startswith(SIMD_PREFIXES)),
        "cpu_flags_all": sorted(cpu["flags"]),
        "logical_cores": cpu["logical_cores"],
        "affinity_cores": cpu["affinity_cores"],
        "threads": threads,
        "gpus": gpu_info() if gpus else None,
        "jetson": jetson_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def detect(targets: list, cpu: dict | None = None, gpus: list | None = None, jetson=None):
    """The target that fits this machine best, and why: a (Target, reason) pair.

    GPU machines: the target whose ``gpu`` name is in the first GPU's NVML name and whose compute
    capability matches (the longest name wins: "H100 80GB HBM3" over "H100"); a Jetson by its
    device-tree model. Otherwise the CPU target whose ``cpu_flags`` this CPU has, the one needing
    the most flags (AVX-512 over AVX2). Readings default to this machine's."""
    from accel.core.errors import TargetError

    cpu = cpu_info() if cpu is None else cpu
    gpus = gpu_info() if gpus is None else gpus
    jetson = jetson_model() if jetson is None else jetson
    cuda = [t for t in targets if t.device == "cuda"]
    if jetson:
        fits = [t for t in cuda if t.gpu and names_gpu(t.gpu, jetson)]
        if fits:
            return max(fits, key=lambda t: len(t.gpu)), f"device-tree model {jetson!r}"
    if gpus:
        gpu = gpus[0]
        fits = [
            t
            for t in cuda
            if t.gpu
            and names_gpu(t.gpu, gpu["name"])
            and gpu["compute_capability"] in (None, t.compute_capability)
        ]
        if fits:
            best = max(fits, key=lambda t: len(t.gpu))
            return (
                best,
                f"NVML GPU 0 {gpu['name']!r}, compute capability {gpu['compute_capability']}",
            )
        same_cc = [t for t in cuda if t.compute_capability == gpu["compute_capability"]]
        if same_cc:
            mem = (gpu.get("memory_total_mib") or 0) / 1024
            best = min(same_cc, key=lambda t: abs((t.memory_gib or 0) - mem))
            return best, (
                f"no target names NVML GPU 0 {gpu['name']!r}; {best.name} has the same compute "
                f"capability {gpu['compute_capability']} and the closest memory"
            )
    flags = set(cpu["flags"])
    fits = [t for t in targets if t.device == "cpu" and set(t.cpu_flags) <= flags]
    if not fits:
        raise TargetError(
            f"no target fits this machine (CPU {cpu['model']!r}, "
            f"{'GPU ' + gpus[0]['name'] if gpus else 'no GPU through NVML'}); add a "
            "profiles/<name>.toml for it (copy the closest one: `accel targets show NAME`)"
        )
    best = max(fits, key=lambda t: len(t.cpu_flags))
    why = f"CPU {cpu['model']!r} has {', '.join(best.cpu_flags) or 'no required flags'}"
    if gpus is None:
        why += "; no GPU through NVML"
    return best, why


def target_mismatch(target, env: dict) -> str | None:
    """Why this machine is not the one ``target`` describes (a CPU without the target's flags; a
    GPU target's GPU missing or of another name or compute capability), or None. Figures
    measured so are not the target's. GPU 0 as NVML numbers it: the one CUDA uses unless
    CUDA_VISIBLE_DEVICES says otherwise."""
    if target.device != "cuda":
        missing = sorted(set(target.cpu_flags) - set(env.get("cpu_flags_all") or []))
        if missing:
            return (
                f"target {target.name} needs CPU flags {', '.join(missing)}, which this CPU "
                f"({env.get('cpu')}) lacks: these figures are not the target's"
            )
        return None
    gpus = env.get("gpus")
    if not gpus:
        if env.get("jetson") and names_gpu(target.gpu, env["jetson"]):
            return None
        return f"target {target.name} is a {target.gpu} GPU, and NVML sees no GPU here"
    g = gpus[0]
    if not names_gpu(target.gpu, g["name"]) or (
        g["compute_capability"] not in (None, target.compute_capability)
    ):
        return (
            f"target {target.name} is a {target.gpu} (compute capability "
            f"{target.compute_capability}), but this machine's GPU 0 is {g['name']} "
            f"({g['compute_capability']}): these figures are not the target's"
        )
    return None
