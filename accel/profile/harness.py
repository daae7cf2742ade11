"""The latency harness, after trtexec and MLPerf LoadGen: warm-up by count and by time, a fixed
iteration count or a duration, percentiles with confidence intervals, peak memory, a per-stage
breakdown, and the three LoadGen scenarios.

- **Timing**: ``perf_counter_ns`` around each call on CPU; CUDA events (``torch.cuda.Event``,
  recorded on the current stream around the call, read after it synchronises) on GPU.
- **Interleaving**: several workloads measured in one run take one call each per round, after each
  has warmed up, so that drift of a shared machine hits them alike. Ratios between them are
  computed pairwise, per round (the paired design), with a confidence interval.
- **Noise**: the coefficient of variation above ``CV_WARNING`` gets a warning; a percentile carries a
  distribution-free confidence interval (order statistics), which ``accel report compare`` uses.
- **Breakdown**: runtimes and the sampling loop mark their stages with ``section(name)`` (NVTX-like
  ranges, free when nothing records); ``breakdown`` runs a workload with a recorder on.
- **Scenarios** (MLPerf LoadGen): SingleStream (one query at a time, p90), Offline (the largest
  batch of the profile, throughput), Server (Poisson arrivals at a rate for a bounded time, queueing
  included in each query's latency, p99 against a bound).

No torch at import: torch is used only when a GPU timer or GPU memory is asked for.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from accel.core.sections import _recorder

PERCENTILES = (50, 90, 95, 99)
CV_WARNING = 0.025
"""A coefficient of variation above 2.5% makes a figure noisy enough to say so."""
Z95 = 1.959963984540054


# ---------------------------------------------------------------- statistics


def quantile_ci(samples, q: float, z: float = Z95) -> tuple[float, float] | None:
    """A distribution-free ~95% confidence interval for the q-quantile: the order statistics at
    1-based ranks floor(n q - h) and ceil(n q + h) + 1, h = z sqrt(n q (1 - q)) (the normal
    approximation of the binomial count of samples below the quantile; Conover, Practical
    Nonparametric Statistics, 3.2). None when a rank falls outside 1..n: there are too few
    samples for a 95% interval of that quantile (53 calls for p90, about 560 for p99)."""
    t = np.sort(np.asarray(samples, dtype=np.float64))
    n = t.size
    half = z * math.sqrt(n * q * (1 - q))
    lo, hi = int(math.floor(n * q - half)), int(math.ceil(n * q + half)) + 1
    if lo < 1 or hi > n:
        return None
    return float(t[lo - 1]), float(t[hi - 1])


def _ci(samples, q: float) -> list[float] | None:
    ci = quantile_ci(samples, q)
    return None if ci is None else list(ci)


def summarize(times_ms) -> dict:
    """p50/p90/p95/p99 (linear interpolation, numpy's default), min, max, mean, std (n - 1),
    coefficient of variation, n, and 95% intervals for p50, p90 and p99 (None where n is too
    small for one)."""
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timings to summarize")
    out: dict = {f"p{p}": float(np.percentile(t, p)) for p in PERCENTILES}
    std = float(t.std(ddof=1)) if t.size > 1 else 0.0
    out.update(
        min=float(t.min()),
        max=float(t.max()),
        mean=float(t.mean()),
        std=std,
        cv=std / float(t.mean()) if t.mean() > 0 else 0.0,
        n=int(t.size),
        p50_ci=_ci(t, 0.5),
        p90_ci=_ci(t, 0.9),
        p99_ci=_ci(t, 0.99),
    )
    return out


def cv_warning(name: str, stats: dict) -> str | None:
    if stats["cv"] <= CV_WARNING:
        return None
    return (
        f"{name}: coefficient of variation {stats['cv']:.1%} is above {CV_WARNING:.1%}; the machine "
        "is noisy (other load, frequency scaling, thermal limits): compare medians, or rerun"
    )


def paired_ratio(a_ms, b_ms) -> dict:
    """How many times faster b is than a, from timings taken in the same rounds: the median of the
    per-round ratios a_i / b_i with its 95% interval, and the ratio of the medians."""
    a, b = np.asarray(a_ms, np.float64), np.asarray(b_ms, np.float64)
    n = min(a.size, b.size)
    r = a[:n] / b[:n]
    return {
        "ratio_of_medians": float(np.median(a) / np.median(b)),
        "paired_median": float(np.median(r)),
        "paired_ci": _ci(r, 0.5),
        "rounds": int(n),
    }


# ---------------------------------------------------------------- timers and memory


def host_timer(fn: Callable[[], object]) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / 1e6


def cuda_timer() -> Callable[[Callable[[], object]], float]:
    """Times a call with CUDA events on the current stream (what trtexec reports as GPU time,
    here around a call that also copies its result back, so it is the call's latency)."""
    from accel.core.errors import TargetError

    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        raise TargetError(
            "a cuda target times calls with CUDA events, which needs torch with a GPU it can "
            "see; profile on the target's machine, or pick a CPU target"
        )
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(fn: Callable[[], object]) -> float:
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    return timed


def _cuda_in_use() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized())


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_memory() -> float | None:
    """Reset the process's peak RSS (Linux: /proc/self/clear_refs) and torch's CUDA peak; the RSS
    at the reset, or None when the peak cannot be reset (then it is the lifetime peak)."""
    if _cuda_in_use():
        sys.modules["torch"].cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_mib("VmRSS")


def peak_memory(baseline_mib: float | None) -> dict:
    """Peak host RSS (VmHWM) and its growth over ``baseline_mib`` (what reset_peak_memory
    returned: the RSS before the workload ran, every model loaded so far included); on GPU
    torch's peak allocation and, through NVML, the memory in use on the device (device-wide:
    every process and CUDA context)."""
    rss = _status_mib("VmHWM")
    if rss is None:  # ru_maxrss: KiB on Linux, bytes on macOS
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss, baseline_mib = (kib / 2**20 if sys.platform == "darwin" else kib / 1024), None
    out: dict = {
        "host_rss_peak_mib": rss,
        "host_rss_growth_mib": None if baseline_mib is None else rss - baseline_mib,
        "host_peak_since": "start" if baseline_mib is None else "warm-up",
    }
    if _cuda_in_use():
        from accel.core.hardware import nvml_memory_used_mib

        torch = sys.modules["torch"]
        out["torch_cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        uuid = str(
            getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "uuid", "")
        )
        out["nvml_device_used_mib"] = nvml_memory_used_mib(uuid) if uuid else None
    return out


# ---------------------------------------------------------------- harness


@dataclass(frozen=True)
class Harness:
    """Warm-up until ``warmup_iterations`` calls and ``warmup_ms`` have both passed; then
    ``iterations`` rounds, or rounds until ``duration_ms`` times the number of workloads has
    passed (one budget for the interleaved run, as long as separate runs of each would take) and
    at least ``min_iterations`` were timed (trtexec: --warmUp=200 --duration=3 --iterations=10)."""

    warmup_iterations: int = 1
    warmup_ms: float = 200.0
    iterations: int | None = None
    duration_ms: float = 3000.0
    min_iterations: int = 10
    timer: str = "host"  # or "cuda"

    @classmethod
    def of(cls, target, **overrides) -> Harness:
        fields = target.harness.model_dump()
        fields["timer"] = "cuda" if target.device == "cuda" else "host"
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


@dataclass
class Measurement:
    times_ms: list[float]
    warmup_iterations: int
    warmup_ms: float
    memory: dict = field(default_factory=dict)

    def stats(self) -> dict:
        return summarize(self.times_ms)


def measure(workloads: dict[str, Callable[[], object]], harness: Harness) -> dict[str, Measurement]:
    """Warm each workload up (peak memory is read over its warm-up, when it runs alone), then
    time interleaved rounds of one call each."""
    timed = cuda_timer() if harness.timer == "cuda" else host_timer
    warm: dict[str, tuple[int, float, dict]] = {}
    for name, fn in workloads.items():
        baseline = reset_peak_memory()
        start, count = time.perf_counter(), 0
        while count < harness.warmup_iterations or (
            (time.perf_counter() - start) * 1e3 < harness.warmup_ms
        ):
            fn()
            count += 1
        warm[name] = (count, (time.perf_counter() - start) * 1e3, peak_memory(baseline))
    times: dict[str, list[float]] = {name: [] for name in workloads}
    start, rounds = time.perf_counter(), 0
    budget_ms = harness.duration_ms * len(workloads)
    while True:
        if harness.iterations is not None:
            if rounds >= harness.iterations:
                break
        elif rounds >= harness.min_iterations and (time.perf_counter() - start) * 1e3 >= budget_ms:
            break
        for name, fn in workloads.items():
            times[name].append(timed(fn))
        rounds += 1
    return {
        name: Measurement(times[name], warm[name][0], warm[name][1], warm[name][2])
        for name in workloads
    }


def measure_interleaved(
    workloads: dict[str, Callable[[], object]], warmup: int, iterations: int
) -> dict[str, dict]:
    """``measure`` with a fixed count of warm-up calls and rounds: the stats per workload."""
    if iterations < 1 or warmup < 0:
        raise ValueError(f"need iterations >= 1 and warmup >= 0, got {iterations}, {warmup}")
    harness = Harness(warmup_iterations=warmup, warmup_ms=0.0, iterations=iterations)
    return {
        name: dict(m.stats(), warmup=m.warmup_iterations)
        for name, m in measure(workloads, harness).items()
    }


# ---------------------------------------------------------------- per-stage breakdown


def breakdown(fn: Callable[[], object], repeats: int = 5) -> dict[str, dict]:
    """Run ``fn`` ``repeats`` times with sections recorded: per section, its stats over the
    repeats (a section entered several times per call is summed per call), in order of entry."""
    calls: list[dict[str, float]] = []
    for _ in range(repeats):
        rec: dict[str, list[float]] = {}
        token = _recorder.set(rec)
        try:
            fn()
        finally:
            _recorder.reset(token)
        calls.append({k: float(sum(v)) for k, v in rec.items()})
    names = list(dict.fromkeys(k for c in calls for k in c))
    out = {}
    for k in names:
        s = summarize([c.get(k, 0.0) for c in calls])
        out[k] = {key: s[key] for key in ("p50", "mean", "min", "max", "n")}
    return out


# ---------------------------------------------------------------- server scenario


def poisson_arrivals(rate_qps: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (s) of a Poisson process of ``rate_qps`` in [0, duration_s): exponential gaps,
    as LoadGen's Server scenario issues queries."""
    if rate_qps <= 0 or duration_s <= 0:
        raise ValueError(f"need rate and duration > 0, got {rate_qps}, {duration_s}")
    expected = rate_qps * duration_s
    gaps = rng.exponential(1.0 / rate_qps, size=int(expected + 10 * math.sqrt(expected) + 20))
    times = np.cumsum(gaps)
    while times[-1] < duration_s:  # astronomically rare; keep the process exact
        more = np.cumsum(rng.exponential(1.0 / rate_qps, size=len(gaps))) + times[-1]
        times = np.concatenate([times, more])
    return times[times < duration_s]


def run_server(
    fn: Callable[[], object],
    rate_qps: float,
    duration_s: float,
    bound_ms: float | None,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Issue queries at Poisson arrival times for ``duration_s`` to one worker that serves them in
    order; a query's latency runs from its arrival to its completion (queueing included). The run
    is valid when its p99 is within ``bound_ms`` (LoadGen's Server criterion). Queries still
    waiting at twice the duration are left unserved (the rate is above what the system sustains)
    and make the run invalid."""
    arrivals = poisson_arrivals(rate_qps, duration_s, np.random.default_rng(seed))
    latencies, busy = [], 0.0
    t0 = clock()
    for arrival in arrivals:
        now = clock() - t0
        if now > 2 * duration_s:
            break
        if now < arrival:
            sleep(arrival - now)
        start = clock()
        fn()
        end = clock()
        busy += end - start
        latencies.append((end - t0 - arrival) * 1e3)
    elapsed = clock() - t0
    stats = summarize(latencies) if latencies else None
    return {
        "rate_qps": rate_qps,
        "duration_s": duration_s,
        "seed": seed,
        "queries": int(len(arrivals)),
        "unserved": int(len(arrivals) - len(latencies)),
        "expected_queries": rate_qps * duration_s,
        "achieved_qps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "utilization": busy / elapsed if elapsed > 0 else 0.0,
        "latency_ms": stats,
        "latencies_ms": latencies,
        "bound_ms": bound_ms,
        "p99_within_bound": None
        if bound_ms is None or stats is None
        else bool(stats["p99"] <= bound_ms and len(latencies) == len(arrivals)),
    }
