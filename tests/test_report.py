"""Reports: the schema's invariants on a real (tiny) profile, the Markdown and plots, loading
errors, and `accel report compare` on runs that differ by less and by more than their noise."""

import copy
import itertools
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest

from accel.core.errors import ReportError
from accel.core.target import load_target
from accel.profile.harness import Harness, summarize
from accel.profile.stage import profile_runtimes
from accel.report import Report, compare, load_report, write_report
from export.torch_runtime import open_model

from test_profile import FakeClock
from tiny import run_cli, write_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    path = write_tiny_pipeline(tmp / "teacher")
    target = load_target("cpu").model_copy(
        update={
            "shapes": load_target("cpu").shapes.model_copy(
                update={"batch": load_target("cpu").shapes.batch.model_copy(update={"max": 8})}
            )
        }
    )
    subjects = {"two steps": open_model(path, steps=2), "four steps": open_model(path, steps=4)}
    harness = Harness(warmup_iterations=2, warmup_ms=0, iterations=8)
    report = profile_runtimes(
        subjects,
        target,
        ["single_stream", "offline", "server"],
        harness,
        rate_qps=20,
        server_duration_s=0.5,
        breakdown_repeats=3,
        progress=lambda m: None,
    )
    out = tmp / "out"
    out.mkdir()
    return write_report(out, report), out


def test_report_invariants(tiny_report):
    report, out = tiny_report
    Report.model_validate(report)
    for scenario in ("single_stream", "offline"):
        s = report["scenarios"][scenario]
        for r in s["results"].values():
            st = r["latency_ms"]
            assert st["min"] <= st["p50"] <= st["p90"] <= st["p95"] <= st["p99"] <= st["max"]
            assert st["n"] == 8 == len(r["times_ms"])  # n is the iterations run
            assert r["warmup"]["iterations"] == 2
            assert st["p50_ci"][0] <= st["p50"] <= st["p50_ci"][1]
            total_s = sum(r["times_ms"]) / 1e3
            assert r["images_per_s"] == pytest.approx(s["batch"] * st["n"] / total_s)
        assert len(s["ratios"]) == 1 and s["ratios"][0]["rounds"] == 8
    assert report["scenarios"]["offline"]["batch"] == 8  # the profile's largest batch
    assert report["scenarios"]["single_stream"]["batch"] == 1
    server = report["scenarios"]["server"]["results"]["two steps"]
    assert server["queries"] == len(server["latencies_ms"]) + server["unserved"]
    steps = [k for k in report["breakdown"]["four steps"] if k.startswith("step ")]
    assert len(steps) == 4 and "conditioning" in report["breakdown"]["four steps"]
    # the budget verdict is each workload's own SingleStream p90 against the target's budget;
    # whether a real model meets it depends on the machine's load, so the verdict itself is
    # tested on a fake clock (test_budget_verdict_on_a_fake_clock)
    ss = report["scenarios"]["single_stream"]["results"]
    budget = report["budget"]
    assert budget["latency_budget_ms"] == report["target"]["latency_budget_ms"] == 250
    assert budget["results"] == {
        name: {"p90_ms": r["latency_ms"]["p90"], "met": r["latency_ms"]["p90"] <= 250}
        for name, r in ss.items()
    }
    assert report["environment"]["cpu"] and report["environment"]["versions"]["numpy"]
    written = json.loads((out / "report.json").read_text())
    assert written["schema"] == "accel.report/2" and written == json.loads(json.dumps(report))
    assert {"latency.png", "breakdown.png"} <= set(report["plots"])
    md = (out / "report.md").read_text()
    assert md.startswith("# accel report: target `cpu`")
    assert "SingleStream (p90), batch 1" in md and "Server: Poisson arrivals" in md


def test_budget_verdict_on_a_fake_clock(tmp_path, monkeypatch):
    """The latency budget's verdict on known timings: `profile_runtimes` on a virtual clock that
    only the (fake) sampling calls advance, by set latencies per workload."""
    import accel.core.sections as sections
    import accel.profile.harness as prof
    import accel.runtime

    clock = FakeClock()
    fake = types.SimpleNamespace(
        perf_counter=clock.perf_counter,
        perf_counter_ns=clock.perf_counter_ns,
        sleep=clock.sleep,
    )
    monkeypatch.setattr(prof, "time", fake)
    monkeypatch.setattr(sections, "time", fake)

    def fake_sample(runtime, plan, noise, labels, rng=None):
        with sections.section("step 0"):
            clock.now += next(runtime.latencies) / 1e3
        return noise

    monkeypatch.setattr(accel.runtime, "sample", fake_sample)
    latencies_ms = {
        "fast": [100.0] * 10,
        "at budget": [250.0] * 10,  # p90 == budget: met
        "tail": [100.0, 300.0] + [100.0] * 7 + [300.0],  # p50 100 ms, p90 300 ms: over
        "slow": [400.0] * 10,
    }
    _, plan = open_model(write_tiny_pipeline(tmp_path / "teacher"), steps=2)  # never run

    def profile(target):
        subjects = {
            name: (types.SimpleNamespace(name="fake", latencies=itertools.cycle(t)), plan)
            for name, t in latencies_ms.items()
        }
        harness = Harness(warmup_iterations=0, warmup_ms=0, iterations=10)
        return profile_runtimes(
            subjects,
            target,
            ["single_stream"],
            harness,
            breakdown_repeats=2,
            progress=lambda m: None,
        )

    cpu = load_target("cpu")
    assert cpu.latency_budget_ms == 250
    out = tmp_path / "out"
    out.mkdir()
    report = write_report(out, profile(cpu))
    ss = report["scenarios"]["single_stream"]["results"]
    for name, t in latencies_ms.items():
        assert ss[name]["times_ms"] == t  # the fake clock's latencies, exactly
    assert ss["tail"]["latency_ms"]["p50"] == 100.0
    budget = report["budget"]
    assert budget["latency_budget_ms"] == 250
    assert budget["results"] == {
        "fast": {"p90_ms": 100.0, "met": True},
        "at budget": {"p90_ms": 250.0, "met": True},
        "tail": {"p90_ms": 300.0, "met": False},
        "slow": {"p90_ms": 400.0, "met": False},
    }
    md = (out / "report.md").read_text()
    assert "## Latency budget: 250 ms at SingleStream p90" in md
    assert "- fast: p90 100.0 ms, within budget" in md
    assert "- at budget: p90 250.0 ms, within budget" in md
    assert "- tail: p90 300.0 ms, OVER budget" in md
    assert "- slow: p90 400.0 ms, OVER budget" in md

    # a looser budget moves the verdict; no budget, no verdict
    loose = profile(cpu.model_copy(update={"latency_budget_ms": 300.0}))["budget"]["results"]
    assert {n: r["met"] for n, r in loose.items()} == {
        "fast": True,
        "at budget": True,
        "tail": True,
        "slow": False,
    }
    unbudgeted = profile(cpu.model_copy(update={"latency_budget_ms": None}))
    assert "budget" not in unbudgeted and unbudgeted["target"]["latency_budget_ms"] is None
    Report.model_validate(unbudgeted)


def test_schema_document_covers_the_report(tiny_report):
    doc = (ROOT / "docs" / "report-schema.md").read_text()
    report, _ = tiny_report
    fields = set(report) | set(report["scenarios"]["single_stream"]["results"]["two steps"])
    fields |= set(report["scenarios"]["server"]["results"]["two steps"])
    fields |= set(report["scenarios"]["single_stream"]["results"]["two steps"]["latency_ms"])
    missing = sorted(f for f in fields if f"`{f}`" not in doc)
    assert not missing, f"docs/report-schema.md does not describe {missing}"


def synthetic(times_ms, name="engine", fingerprint="f"):
    """A minimal valid report around SingleStream timings."""
    stats = summarize(times_ms)
    return {
        "schema": "accel.report/2",
        "created": "2026-01-01T00:00:00+00:00",
        "target": {"name": "cpu", "fingerprint": fingerprint},
        "harness": {
            "warmup_iterations": 1,
            "warmup_ms": 200.0,
            "iterations": None,
            "duration_ms": 3000.0,
            "min_iterations": 10,
            "timer": "host",
        },
        "environment": {
            "cpu": "test",
            "cpu_flags": [],
            "logical_cores": 2,
            "platform": "test",
            "python": "3",
            "versions": {},
            "gpus": None,
        },
        "workloads": {name: {}},
        "scenarios": {
            "single_stream": {
                "batch": 1,
                "metric": "p90",
                "results": {
                    name: {
                        "latency_ms": stats,
                        "times_ms": list(map(float, times_ms)),
                        "warmup": {"iterations": 1, "ms": 200},
                        "memory": {},
                        "images_per_s": 1e3 / stats["p50"],
                    }
                },
                "ratios": [],
            }
        },
        "breakdown": {},
        "warnings": [],
    }


def runs(shift, seed=0, n=200):
    rng = np.random.default_rng(seed)
    base = 10 * rng.lognormal(0, 0.05, n)  # ~5% noise
    other = 10 * (1 + shift) * np.random.default_rng(seed + 1).lognormal(0, 0.05, n)
    return synthetic(base), synthetic(other)


def test_compare_within_noise_and_beyond():
    a, b = runs(0.005)
    (row,), notes = compare(a, b)
    assert row["verdict"] == "within noise" and row["metric"] == "p50" and not notes
    a, b = runs(0.30)
    (row,), _ = compare(a, b)
    assert row["verdict"] == "regression" and row["change"] == pytest.approx(0.30, abs=0.05)
    (row,), _ = compare(b, a)
    assert row["verdict"] == "improvement"
    (row,), _ = compare(a, b, threshold=0.5)  # a 30% change under a 50% threshold
    assert row["verdict"] == "within noise"
    _, notes = compare(
        a,
        synthetic(
            b["scenarios"]["single_stream"]["results"]["engine"]["times_ms"], fingerprint="g"
        ),
    )
    assert "different targets" in notes[0]
    few_a, few_b = synthetic(np.linspace(1, 2, 4)), synthetic(np.linspace(3, 4, 4))
    (row,), _ = compare(few_a, few_b)  # 4 calls cannot bound a median at 95%
    assert row["verdict"] == "too few samples"


def test_compare_notes_other_batches_and_flags_newly_unserved_queries():
    a, b = runs(0.0)
    b["scenarios"]["single_stream"]["batch"] = 4
    _, notes = compare(a, b)
    assert notes == ["single_stream: batch 1 in A, 4 in B"]

    def server(latencies, unserved):
        return {
            "batch": 1,
            "rate_qps": 10.0,
            "duration_s": 10.0,
            "bound_ms": None,
            "metric": "p99",
            "results": {
                "engine": {
                    "rate_qps": 10.0,
                    "duration_s": 10.0,
                    "queries": len(latencies) + unserved,
                    "unserved": unserved,
                    "achieved_qps": 9.0,
                    "utilization": 0.5,
                    "latency_ms": summarize(latencies),
                    "latencies_ms": list(latencies),
                    "bound_ms": None,
                    "p99_within_bound": None,
                }
            },
        }

    lat = list(10 * np.random.default_rng(0).lognormal(0, 0.05, 100))
    a["scenarios"]["server"], b["scenarios"]["server"] = server(lat, 0), server(lat, 7)
    Report.model_validate(a), Report.model_validate(b)
    rows, notes = compare(a, b)
    (row,) = [r for r in rows if r["scenario"] == "server"]
    assert row["verdict"] == "regression" and row["change"] == 0.0
    assert "7 queries left unserved" in notes[-1]


def test_report_compare_cli_exit_codes(tmp_path, monkeypatch, capsys):
    for shift, expected in ((0.005, 0), (0.30, 1)):
        a, b = runs(shift)
        (tmp_path / "a.json").write_text(json.dumps(a))
        (tmp_path / "b.json").write_text(json.dumps(b))
        code, out, err = run_cli(
            monkeypatch, capsys, "report", "compare", tmp_path / "a.json", tmp_path / "b.json"
        )
        assert code == expected, out + err
        assert "| single_stream | engine | p50 |" in out
        if expected:
            assert "regression" in err and "Traceback" not in err
        else:
            assert "no regression beyond the noise" in out


def test_bad_reports_are_refused_with_the_reason(tmp_path, monkeypatch, capsys):
    good = synthetic(np.linspace(1, 2, 20))
    cases = {
        "missing": (None, "report not found"),
        "notjson": ("{oops", "is not JSON"),
        "oldschema": (json.dumps({"schema": "accel.report/1"}), "not an accel.report/2 report"),
    }
    broken = copy.deepcopy(good)
    broken["scenarios"]["single_stream"]["results"]["engine"]["times_ms"].pop()
    cases["count"] = (json.dumps(broken), r"latency_ms.n is 20 but 19 timings")
    unordered = copy.deepcopy(good)
    unordered["scenarios"]["single_stream"]["results"]["engine"]["latency_ms"]["p99"] = 0.5
    cases["order"] = (json.dumps(unordered), r"min <= p50 <= p90")
    # what compare and the Markdown read must be there: no KeyError later
    no_fingerprint = copy.deepcopy(good)
    del no_fingerprint["target"]["fingerprint"]
    cases["target"] = (json.dumps(no_fingerprint), r"at target.fingerprint: Field required")
    zero = copy.deepcopy(good)
    zero["scenarios"]["single_stream"]["results"]["engine"]["latency_ms"]["min"] = 0.0
    cases["zero"] = (json.dumps(zero), r"latency_ms.min: Input should be greater than 0")
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name}.json"
        if text is not None:
            path.write_text(text)
        with pytest.raises(ReportError, match=message):
            load_report(path)
    (tmp_path / "good.json").write_text(json.dumps(good))
    code, _, err = run_cli(
        monkeypatch, capsys, "report", "compare", tmp_path / "good.json", tmp_path / "notjson.json"
    )
    assert code == 2 and "is not JSON" in err and "Traceback" not in err  # 1 means regression
    assert re.search(r"^error: ", err)
