"""The latency harness on synthetic timings and a fake clock, with known answers."""

import itertools
import types

import numpy as np
import pytest
from scipy import stats

import accel.profile.harness as prof
from accel.core.sections import section
from accel.profile.harness import (
    Harness,
    breakdown,
    cv_warning,
    measure,
    measure_interleaved,
    paired_ratio,
    peak_memory,
    poisson_arrivals,
    quantile_ci,
    reset_peak_memory,
    run_server,
    summarize,
)


class FakeClock:
    """perf_counter / perf_counter_ns / sleep on a virtual clock that only work advances."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def perf_counter_ns(self):
        return int(round(self.now * 1e9))

    def sleep(self, seconds):
        self.now += seconds

    def work(self, ms):
        def fn():
            self.now += ms / 1e3

        return fn


@pytest.fixture
def clock(monkeypatch):
    import accel.core.sections as sections

    c = FakeClock()
    fake = types.SimpleNamespace(
        perf_counter=c.perf_counter, perf_counter_ns=c.perf_counter_ns, sleep=c.sleep
    )
    monkeypatch.setattr(prof, "time", fake)
    monkeypatch.setattr(sections, "time", fake)
    return c


def test_summary_of_known_timings():
    s = summarize(list(range(1, 101)))  # 1..100 ms
    assert s["n"] == 100 and s["min"] == 1 and s["max"] == 100 and s["mean"] == 50.5
    assert s["p50"] == 50.5 and abs(s["p90"] - 90.1) < 1e-9 and abs(s["p99"] - 99.01) < 1e-9
    assert abs(s["p95"] - 95.05) < 1e-9
    std = np.std(np.arange(1, 101), ddof=1)
    assert abs(s["std"] - std) < 1e-9 and abs(s["cv"] - std / 50.5) < 1e-12
    # ranks 100/2 -/+ 1.96 * 5 = 40.2, 59.8 -> order statistics 40 and 61
    assert s["p50_ci"] == [40.0, 61.0]
    # p90: 90 -/+ 5.88 -> ranks 84 and 97; p99 would need rank 102 of 100: no interval
    assert s["p90_ci"] == [84.0, 97.0] and s["p99_ci"] is None
    assert s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]


def test_quantile_interval_covers_the_true_quantile():
    rng = np.random.default_rng(0)
    trials = 400
    true_median, true_p90 = np.log(2), np.log(10)  # of Exp(1)
    hits50 = hits90 = 0
    for _ in range(trials):
        t = rng.exponential(size=60)
        lo, hi = quantile_ci(t, 0.5)
        hits50 += lo <= true_median <= hi
        lo, hi = quantile_ci(t, 0.9)
        hits90 += lo <= true_p90 <= hi
    # nominal 95%; order-statistic intervals are slightly conservative
    assert 0.92 <= hits50 / trials <= 0.995
    assert 0.90 <= hits90 / trials <= 0.995


def test_too_few_samples_give_no_interval_rather_than_a_narrow_one():
    assert quantile_ci(range(10), 0.9) is None  # the default 10 calls cannot bound p90
    assert quantile_ci(range(10), 0.5) == (0.0, 9.0)  # ranks 1 and 10: the whole sample
    assert quantile_ci(range(52), 0.9) is None and quantile_ci(range(53), 0.9) is not None
    assert paired_ratio([2.0, 2.0], [1.0, 1.0])["paired_ci"] is None


def test_cv_warning_above_two_and_a_half_percent():
    quiet = summarize(100 + np.random.default_rng(0).normal(0, 1, 200))  # CV ~ 1%
    noisy = summarize(100 + np.random.default_rng(0).normal(0, 5, 200))  # CV ~ 5%
    assert cv_warning("quiet", quiet) is None
    assert "coefficient of variation" in cv_warning("noisy", noisy)
    assert "above 2.5%" in cv_warning("noisy", noisy)


def test_fixed_iterations_interleave_after_per_workload_warmup():
    calls = []
    counter = itertools.count()
    work = {name: (lambda name=name: calls.append((name, next(counter)))) for name in "ab"}
    out = measure_interleaved(work, warmup=2, iterations=5)
    assert [c[0] for c in calls[:4]] == ["a", "a", "b", "b"]  # warm-up, per workload
    assert [c[0] for c in calls[4:]] == ["a", "b"] * 5  # then one call of each per round
    for s in out.values():
        assert s["n"] == 5 and s["warmup"] == 2 and s["min"] <= s["p50"] <= s["p90"] <= s["max"]


def test_warmup_by_time_and_by_count(clock):
    h = Harness(warmup_iterations=3, warmup_ms=200, iterations=4)
    out = measure({"slow": clock.work(50), "fast": clock.work(1)}, h)
    assert out["slow"].warmup_iterations == 4  # 200 ms at 50 ms a call
    assert out["fast"].warmup_iterations == 200  # 200 ms at 1 ms a call, above the count of 3
    assert out["slow"].warmup_ms >= 200
    h = Harness(warmup_iterations=3, warmup_ms=0, iterations=4)
    assert measure({"slow": clock.work(50)}, h)["slow"].warmup_iterations == 3


def test_duration_and_minimum_iterations(clock):
    # two workloads of 100 + 50 ms a round; 1 s each -> 2 s of rounds -> 14 rounds (>= 2000 ms)
    h = Harness(warmup_iterations=0, warmup_ms=0, duration_ms=1000, min_iterations=3)
    out = measure({"a": clock.work(100), "b": clock.work(50)}, h)
    assert len(out["a"].times_ms) == len(out["b"].times_ms) == 14
    assert np.allclose(out["a"].times_ms, 100) and np.allclose(out["b"].times_ms, 50)
    h = Harness(warmup_iterations=0, warmup_ms=0, duration_ms=10, min_iterations=25)
    assert len(measure({"a": clock.work(100)}, h)["a"].times_ms) == 25
    h = Harness(warmup_iterations=0, warmup_ms=0, iterations=7, duration_ms=1e9)
    assert out["a"].stats()["n"] == 14 and len(measure({"a": clock.work(1)}, h)["a"].times_ms) == 7


def test_harness_defaults_come_from_the_target():
    from accel.core.target import load_target

    from tiny import gpu_target

    h = Harness.of(load_target("cpu"))
    assert (h.warmup_ms, h.duration_ms, h.min_iterations, h.iterations) == (200, 3000, 10, None)
    assert h.timer == "host"
    assert Harness.of(gpu_target()).timer == "cuda"
    assert Harness.of(load_target("cpu"), iterations=5, warmup_ms=None).iterations == 5


def test_paired_ratio_of_interleaved_rounds():
    b = np.random.default_rng(0).uniform(1, 2, 50)
    r = paired_ratio(2 * b, b)
    assert r["paired_median"] == pytest.approx(2.0) and r["paired_ci"] == pytest.approx([2, 2])
    assert r["ratio_of_medians"] == pytest.approx(2.0) and r["rounds"] == 50


def test_breakdown_sums_sections_per_call_and_sections_are_free_otherwise(clock):
    def call():
        for _ in range(3):
            with section("conditioning"):
                clock.now += 0.001
            with section("step"):
                clock.now += 0.010
        with section("decode"):
            clock.now += 0.005

    call()  # no recorder: sections do nothing
    out = breakdown(call, repeats=4)
    assert list(out) == ["conditioning", "step", "decode"]
    assert out["conditioning"]["p50"] == pytest.approx(3.0)
    assert out["step"]["p50"] == pytest.approx(30.0) and out["decode"]["n"] == 4


def test_poisson_arrival_counts_within_poisson_bounds():
    rate, duration = 40.0, 5.0
    lam = rate * duration
    counts = np.array(
        [len(poisson_arrivals(rate, duration, np.random.default_rng(s))) for s in range(300)]
    )
    lo, hi = stats.poisson.ppf([1e-5, 1 - 1e-5], lam)
    assert ((counts >= lo) & (counts <= hi)).all()
    # mean and variance of a Poisson(200) count, within 4 standard errors
    assert abs(counts.mean() - lam) < 4 * np.sqrt(lam / len(counts))
    assert 0.7 * lam < counts.var(ddof=1) < 1.4 * lam
    gaps = np.diff(poisson_arrivals(rate, 200.0, np.random.default_rng(1)))
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 1e-3
    assert (poisson_arrivals(rate, duration, np.random.default_rng(0)) < duration).all()


def test_server_latency_includes_queueing(clock):
    idle = run_server(
        clock.work(1), 5, 20, bound_ms=10, clock=clock.perf_counter, sleep=clock.sleep
    )
    assert idle["unserved"] == 0 and idle["queries"] == len(idle["latencies_ms"])
    assert np.percentile(idle["latencies_ms"], 50) == pytest.approx(1.0)  # rarely a queue
    assert idle["p99_within_bound"] is True and idle["utilization"] < 0.05
    # 30 q/s at 100 ms each is three times the capacity: the queue grows, the bound is missed,
    # and what is still queued at twice the duration is left unserved
    busy = run_server(
        clock.work(100), 30, 10, bound_ms=200, clock=clock.perf_counter, sleep=clock.sleep
    )
    assert busy["p99_within_bound"] is False and busy["utilization"] > 0.99
    assert busy["unserved"] > 0 and min(busy["latencies_ms"]) >= 100 - 1e-6


def test_peak_memory_sees_an_allocation_over_its_baseline():
    baseline = reset_peak_memory()
    if baseline is None:
        pytest.skip("the peak RSS cannot be reset here (no /proc/self/clear_refs)")
    import mmap

    # 64 MiB of fresh pages, touched: an anonymous mapping, so that no freed but still resident
    # heap of earlier tests (malloc reuses it; seen after the ONNX-export tests) absorbs them
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\x01" * len(block))
    after = peak_memory(baseline)
    assert after["host_rss_growth_mib"] >= 50 and after["host_peak_since"] == "warm-up"
    assert after["host_rss_peak_mib"] >= baseline + 50
    block.close()
