"""The latency harness on synthetic timings with known answers."""

import itertools

import numpy as np

from accel.profile import environment, measure_interleaved, summarize


def test_summary_of_known_timings():
    s = summarize(list(range(1, 101)))  # 1..100 ms
    assert s["n"] == 100 and s["min"] == 1 and s["max"] == 100 and s["mean"] == 50.5
    assert s["p50"] == 50.5 and abs(s["p90"] - 90.1) < 1e-9 and abs(s["p99"] - 99.01) < 1e-9
    assert abs(s["std"] - np.std(np.arange(1, 101), ddof=1)) < 1e-9


def test_interleaved_measurement_counts_and_order():
    calls = []
    counter = itertools.count()
    work = {name: (lambda name=name: calls.append((name, next(counter)))) for name in "ab"}
    out = measure_interleaved(work, warmup=2, iterations=5)
    assert [c[0] for c in calls[:4]] == ["a", "a", "b", "b"]  # warm-up, per workload
    assert [c[0] for c in calls[4:]] == ["a", "b"] * 5  # then one call of each per round
    for s in out.values():
        assert s["n"] == 5 and s["warmup"] == 2 and s["min"] <= s["p50"] <= s["p90"] <= s["max"]


def test_environment_names_the_machine():
    env = environment(threads=2)
    assert env["cpu"] and env["logical_cores"] >= 1 and env["threads"] == 2
    assert "numpy" in env["versions"]
