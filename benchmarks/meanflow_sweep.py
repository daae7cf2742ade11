"""MeanFlow settings on the shipped flow teacher: each JSON argument overrides the frontier's
MeanFlow stage config (w = 1.5, 1000 iterations, batch 64, lr 1e-4, digits), trains through the
store and scores one checkpoint at 1, 2, 4 and 8 steps (seed 0 x 1000 samples).

    python benchmarks/meanflow_sweep.py '{"shift": 1.0}' '{"shift": 1.0, "flow_map_ratio": 1.0,
        "p_mean": 0.0, "p_std": 2.5, "iterations": 2000, "learning_rate": 2e-4}'

Appends to benchmarks/results/meanflow_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from frontier import FLOW_BUDGET, STEPS, _stage, evaluate

from accel.assets.make_flow_teacher import FLOW_TEACHER_DIR
from accel.pipeline import default_store, run_recipe
from accel.recipe import load_recipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="JSON objects of MeanFlowConfig overrides")
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/meanflow_sweep.json"))
    args = p.parse_args()
    store = default_store(args.store)
    rows = json.loads(args.out.read_text()) if args.out.is_file() else []
    for spec in args.configs:
        config = {**FLOW_BUDGET, **json.loads(spec)}
        with tempfile.TemporaryDirectory() as tmp:
            recipe = Path(tmp) / "recipe.toml"
            recipe.write_text(
                f'name = "meanflow-sweep"\nsource = "{FLOW_TEACHER_DIR}"\ntarget = "cpu"\n'
                + _stage("meanflow", **config)
            )
            (artifact,) = run_recipe(load_recipe(recipe), store, lambda m: print(f"  {m}"))
        for steps in STEPS:
            e = evaluate(artifact.path, steps, [0], 1000)
            rows.append(
                {
                    "config": config,
                    "steps": steps,
                    "fd": e["fd_digits"],
                    "acc": e["class_accuracy"],
                    "train_s": artifact.metrics.get("wall_seconds"),
                }
            )
            print(spec, steps, round(e["fd_digits"], 2), e["class_accuracy"], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
