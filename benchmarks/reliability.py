"""The reliability suite (issue #18) run once, for the figures of docs/RELIABILITY.md: every test
under tests/reliability (slow ones included: the kill-at-every-point and fuzzing campaigns), each
appending its row to one report, then the load test (benchmarks/load_test.py).

    python benchmarks/reliability.py [--kill-trials 5] [--fuzz-cases 100] [--skip-load]
        [--out benchmarks/results/reliability.json]
    python benchmarks/reliability.py --tables benchmarks/results/reliability.json

Writes the rows, the suite's pass/fail counts and wall time, and the machine to --out, and prints
the tables (Markdown). A failing test fails the run (exit 1): its figures are not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_suite(kill_trials: int, fuzz_cases: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rows.jsonl"
        env = {
            **os.environ,
            "ACCEL_RELIABILITY_REPORT": str(report),
            "ACCEL_KILL_TRIALS": str(kill_trials),
            "ACCEL_FUZZ_CASES": str(fuzz_cases),
        }
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
             str(ROOT / "tests" / "reliability")],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        rows = (
            [json.loads(line) for line in report.read_text().splitlines()]
            if report.exists()
            else []
        )
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|skipped)", tail)}
    if proc.returncode:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-2000:])
    return {
        "returncode": proc.returncode,
        "tests": counts,
        "seconds": round(seconds, 1),
        "kill_trials": kill_trials,
        "fuzz_cases": fuzz_cases,
        "rows": rows,
    }


def kill_table(rows: list[dict]) -> str:
    by = defaultdict(dict)
    for r in rows:
        if r["row"] == "kill":
            by[(r["kind"], r["stage"])][r["way"]] = r
    out = [
        "| stage kind (stage) | points | s | trials: timer / point | killed inside the stage | "
        "temp dirs left, then cleaned | resumed from a checkpoint | rerun finished, all hashes "
        "verify, results identical |",
        "|---|---:|---:|---|---|---:|---:|---|",
    ]
    for (kind, stage), ways in by.items():
        t, p = ways.get("time", {}), ways.get("point", {})
        n = t.get("trials", 0) + p.get("trials", 0)
        out.append(
            f"| {kind} ({stage}) | {p.get('points', t.get('points'))} | {t.get('seconds')} | "
            f"{t.get('trials', 0)} / {p.get('trials', 0)} | "
            f"{t.get('in_stage', 0) + p.get('in_stage', 0)} of {n} | "
            f"{t.get('tmp_left_then_cleaned', 0) + p.get('tmp_left_then_cleaned', 0)} | "
            f"{t.get('resumed_from_checkpoint', 0) + p.get('resumed_from_checkpoint', 0)} | "
            f"{t.get('verified_and_identical', 0) + p.get('verified_and_identical', 0)} of {n} |"
        )
    return "\n".join(out)


def fuzz_table(rows: list[dict]) -> str:
    out = [
        "| input | cases | result | exit 1 | exit 2 | distinct messages | tracebacks | "
        "half-written |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["row"] == "fuzz":
            o = r["outcomes"]
            out.append(
                f"| {r['input']} | {r['cases']} | {o.get('result', 0)} | {o.get('exit 1', 0)} | "
                f"{o.get('exit 2', 0)} | {r['distinct_messages']} | 0 | 0 |"
            )
    return "\n".join(out)


def load_table(path: Path) -> str:
    """The load test's levels (benchmarks/load_test.py's JSON) as a Markdown table."""
    data = json.loads(path.read_text())
    out = [
        "| offered rate (req/s) | sent | served/s | p50 ms | p99 ms | well-formed: 200 / 503 / "
        "other | malformed 400 | oversized 413 | wrong images | server RSS after 1 s idle (MiB) |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for lv in data["levels"]:
        k = lv["statuses_by_kind"]
        good = k.get("good", {})
        other = sum(v for s, v in good.items() if s not in ("200", "503"))
        out.append(
            f"| {lv['rate_per_s']} | {lv['sent']} | {lv['served_per_s']:.2f} | "
            f"{lv['p50_ms']:.1f} | {lv['p99_ms']:.1f} | {good.get('200', 0)} / "
            f"{good.get('503', 0)} / {other} | {k.get('malformed', {}).get('400', 0)} | "
            f"{k.get('oversized', {}).get('413', 0)} | {lv['wrong_images']} | "
            f"{lv['rss_after_1s_idle_mib']:.2f} |"
        )
    rss = data["rss_mib"]
    out.append(f"\nRSS before the load {rss['before']:.2f} MiB, 3 s after it "
               f"{rss['after_idle_3s']:.2f} MiB; the server's counts: {data['server_stats']}")  # fmt: skip
    return "\n".join(out)


def print_tables(result: dict) -> None:
    suite = result["suite"]
    print(f"suite: {suite['tests']} in {suite['seconds']} s\n")
    print(kill_table(suite["rows"]) + "\n")
    print(fuzz_table(suite["rows"]) + "\n")
    for r in suite["rows"]:
        if r["row"] not in ("kill", "fuzz"):
            print(json.dumps(r))
    if result.get("load_test"):
        print("\n" + load_table(ROOT / result["load_test"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kill-trials", type=int, default=5)
    ap.add_argument("--fuzz-cases", type=int, default=100)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "reliability.json"
    )
    ap.add_argument("--tables", type=Path, help="only print the tables of this result JSON")
    args = ap.parse_args()
    if args.tables:
        print_tables(json.loads(args.tables.read_text()))
        return
    suite = run_suite(args.kill_trials, args.fuzz_cases)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "command": "python benchmarks/reliability.py " + " ".join(sys.argv[1:]),
        "suite": suite,
    }
    if suite["returncode"]:
        print(f"the suite failed ({suite['tests']}): no figures", file=sys.stderr)
        sys.exit(1)
    if not args.skip_load:
        load = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py")], cwd=ROOT)
        result["load_test"] = "benchmarks/results/load_test.json" if load.returncode == 0 else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)


if __name__ == "__main__":
    main()
