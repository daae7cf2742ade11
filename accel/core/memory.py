"""Peak memory of a piece of work, as a stage's metrics record it (``accel.pipeline``).

Resident memory is the kernel's high-water mark of this process (``VmHWM`` in
``/proc/self/status``), reset where the work starts by writing 5 to ``/proc/self/clear_refs``
(Linux >= 4.0); where that is impossible the figure is the process's peak since it started
(``ru_maxrss``), and says so. Child processes that ran to completion meanwhile (a child export
per component) count through ``RUSAGE_CHILDREN``'s peak, the largest child's. GPU memory is
torch's peak allocation on each visible device, reset at the start, where CUDA is already in use
(torch is never imported for it)."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any


def _hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


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
