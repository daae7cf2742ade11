"""Named sections of a call (conditioning, text encoding, a denoising step, a copy, the VAE
decode): runtimes mark them, the profiler's ``breakdown`` records them. Costs nothing while no
breakdown is being recorded."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

_recorder: contextvars.ContextVar[dict[str, list[float]] | None] = contextvars.ContextVar(
    "accel_profile_recorder", default=None
)


def recording() -> bool:
    """Whether a breakdown is being recorded (GPU runtimes then synchronise inside sections)."""
    return _recorder.get() is not None


@contextlib.contextmanager
def section(name: str) -> Iterator[None]:
    """Mark a stage of a call (conditioning, a denoising step, a copy) for ``breakdown``."""
    rec = _recorder.get()
    if rec is None:
        yield
        return
    start = time.perf_counter_ns()
    try:
        yield
    finally:
        rec.setdefault(name, []).append((time.perf_counter_ns() - start) / 1e6)
