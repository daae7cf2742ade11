"""The demo as a benchmark: run the shipped recipe on a fresh store, time every stage, and write
the figures the README and docs/BENCHMARKS.md quote, as JSON.

    python benchmarks/demo.py [--recipe text-digits|digits-pixel]
        [--out benchmarks/results/demo-<recipe>.json]

The report's figures come from the profile stage (accel.profile.stage, the harness in
accel.profile): FD-digits and class accuracy as means over two seeds of 1000 samples, latencies
from interleaved runs in MLPerf's SingleStream and Offline scenarios.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from accel.cli import DEMO_RECIPES, demo_recipe
from accel.core.artifact import Store
from accel.pipeline import run_recipe
from accel.recipe import load_recipe


def shares(breakdown: dict) -> dict[str, float]:
    """Each component's share of one image's latency, from the per-stage breakdown's medians:
    the denoiser is every step together; "other" is conditioning and the sampler updates."""
    total: dict[str, float] = {}
    for stage, t in breakdown.items():
        part = "denoiser" if stage.startswith("step ") else stage
        part = part if part in ("denoiser", "text encoding", "vae decode") else "other"
        total[part] = total.get(part, 0.0) + t["p50"]
    whole = sum(total.values())
    return {part: ms / whole for part, ms in total.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=DEMO_RECIPES, default=DEMO_RECIPES[0])
    p.add_argument("--out", type=Path, default=None, help="default: results/demo-RECIPE.json")
    args = p.parse_args()
    args.out = args.out or Path(f"benchmarks/results/demo-{args.recipe}.json")
    recipe = demo_recipe(args.recipe)
    with tempfile.TemporaryDirectory(prefix="accel-bench-") as tmp:
        store = Store(tmp)
        stage_times: list[tuple[str, float]] = []
        last = [time.perf_counter()]

        def progress(msg: str) -> None:
            print(msg, flush=True)
            if "done in" in msg:
                stage_times.append((msg.split(":")[0], time.perf_counter() - last[0]))
            if msg.endswith(": running"):
                last[0] = time.perf_counter()

        t0 = time.perf_counter()
        artifacts = run_recipe(load_recipe(recipe), store, progress)
        wall = time.perf_counter() - t0
        cold = [(msg, s) for msg, s in stage_times]
        t1 = time.perf_counter()
        run_recipe(load_recipe(recipe), store, lambda m: None)
        rerun = time.perf_counter() - t1
        profile = next(a for a in artifacts if a.stage == "profile")
        report = json.loads((profile.path / "report.json").read_text())
    q = report["quality"]
    teacher, teacher_ddim, student = q.values()
    summary = {
        "command": f"python benchmarks/demo.py --recipe {args.recipe}",
        "demo_wall_seconds": wall,
        "rerun_wall_seconds": rerun,
        "stage_seconds": dict(cold),
        "fd_floor": report["fd_floor"],
        "quality": q,
        "student_fd_over_teacher_fd": student["fd_digits"] / teacher["fd_digits"],
        "student_fd_over_teacher_ddim_fd": student["fd_digits"] / teacher_ddim["fd_digits"],
        "speedup_end_to_end_p50": report["speedup_end_to_end_p50"],
        "latency_ms": {
            scenario: {
                "batch": s["batch"],
                **{name: r["latency_ms"] for name, r in s["results"].items()},
            }
            for scenario, s in report["scenarios"].items()
        },
        "ratios": {scenario: s["ratios"] for scenario, s in report["scenarios"].items()},
        "component_share": {name: shares(b) for name, b in report["breakdown"].items()},
        "environment": report["environment"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: v
                for k, v in summary.items()
                if k not in ("latency_ms", "ratios", "environment", "quality")
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
