"""Peak memory of a piece of work, as a stage's metrics record it (``accel.pipeline``).

Resident memory is the kernel's high-water mark of this process (``VmHWM`` in
``/proc/self/status``), reset where the work starts by writing 5 to ``/proc/self/clear_refs``
(Linux >= 4.0); where that is impossible the figure is the process's peak since it started
(``ru_maxrss``), and says so. Child processes that ran to completion meanwhile (a child export
per component) count through ``RUSAGE_CHILDREN``'s peak, the largest child's. GPU memory is
torch's peak allocation on each visible device, reset at the start, where CUDA is already in use
(torch is never imported for it)."""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from typing import Any

DRAW_PIXELS = 1 << 18
"""Image pixels per batch of a draw or an encode: one 512 x 512 image (SD1.5; SDXL's 1024 px ones
go one at a time too), 64 of the tiny models', so that activations (a VAE decoder's at 512 px:
2 GB per tensor at batch 4) stay bounded as the images grow (``accel.runtime.loop.draw``,
``distill.data``)."""


def _proc_bytes(file: str, key: str) -> int | None:
    """The ``key: N kB`` line of a /proc file in bytes; None where it cannot be read."""
    try:
        for line in Path(file).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _hwm_bytes() -> int | None:
    return _proc_bytes("/proc/self/status", "VmHWM")


def _cuda():
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


class PeakMemory:
    """``with PeakMemory() as peak: work()``; then ``peak.metrics()``: ``peak_rss_mb`` (and
    ``peak_rss_since`` = "process start" where the mark could not be reset), ``peak_child_rss_mb``
    where a child process ran, ``peak_gpu_mb`` where CUDA ran."""

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = _hwm_bytes() is not None
        except OSError:
            self.reset = False
        self.children0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        cuda = _cuda()
        if cuda is not None:
            for i in range(cuda.device_count()):
                cuda.reset_peak_memory_stats(i)
        return self

    def __exit__(self, *exc) -> None:
        hwm = _hwm_bytes() if self.reset else None
        self.rss = (
            hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        self.child = children * 1024 if children > self.children0 else None
        cuda = _cuda()
        self.gpu = (
            max(cuda.max_memory_allocated(i) for i in range(cuda.device_count()))
            if cuda is not None and cuda.device_count()
            else None
        )

    def metrics(self) -> dict[str, Any]:
        mb = 2**20
        out: dict[str, Any] = {"peak_rss_mb": round(self.rss / mb, 1)}
        if not self.reset:
            out["peak_rss_since"] = "process start"
        if self.child is not None:
            out["peak_child_rss_mb"] = round(self.child / mb, 1)
        if self.gpu is not None:
            out["peak_gpu_mb"] = round(self.gpu / mb, 1)
        return out


def give_back() -> None:
    """Collect garbage and hand freed heap pages back to the kernel (glibc's ``malloc_trim``).
    A closed onnxruntime session of a 3.4 GB UNet leaves GBs of freed but resident heap in
    glibc's arenas, which the next session would otherwise add to; elsewhere only collects."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        pass


_ASKED = (  # how allocators name the size of the allocation that failed
    re.compile(r"tried to allocate (\d+) bytes", re.I),  # torch's CPU allocator
    re.compile(r"tried to allocate ([\d.]+) ([KMGT]i?B)", re.I),  # torch's CUDA allocator
    re.compile(r"buffer of size (\d+)", re.I),  # onnxruntime's arena
)
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def asked_bytes(error: BaseException) -> int | None:
    """The size of the allocation an out-of-memory error reports, where it reports one."""
    text = str(error)
    for pattern in _ASKED:
        m = pattern.search(text)
        if m:
            unit = _UNITS[m.group(2).upper()] if m.lastindex == 2 else 1
            return int(float(m.group(1)) * unit)
    return None


def machine_bytes() -> int | None:
    """This machine's memory (``MemTotal``), None where /proc/meminfo is not there."""
    return _proc_bytes("/proc/meminfo", "MemTotal")


def gigabytes(n: int | float) -> str:
    """Bytes in GB of 2^30, as the stages' ``peak_rss_mb`` figures count MB of 2^20."""
    return f"{n / 2**30:.1f} GB"


STAGE_FILE_ENV = "ACCEL_STAGE_FILE"
"""Where a watched run (``accel.cli.console``) writes the name of the stage it is running, so
that its parent can name the stage when the kernel kills the run for memory."""


def note_stage(name: str, tries: str) -> None:
    """Record that stage ``name`` starts, and what to try if it runs out of memory (for a
    watched run; elsewhere nothing)."""
    import os

    file = os.environ.get(STAGE_FILE_ENV)
    if file:
        try:
            Path(file).write_text(f"{name}\n{tries}\n")
        except OSError:
            pass
