"""Why ADD failed on the digits teacher, and which settings fix it: a one-factor-at-a-time
ablation of ADD's 1-step student (issue #16, point 3).

    python benchmarks/add_ablation.py [--variants ...] [--iterations 300] [--seeds 0] [--n 1000]

Each variant is a one-stage recipe on the shipped digits teacher run through the store (a rerun
reuses every trained student); its student is sampled at 1 step (``--steps``: also the 2- and
4-step sub-grids of ADD's 4-step T_student) on the noise ``accel sample`` uses and scored with
FD-digits and class accuracy. Writes benchmarks/results/add_ablation.json (its figures: stage
version 1, whose mean distance the variants' lambdas here reproduce as a squared norm).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from frontier import GUIDANCE, _stage, evaluate

from accel.demo.digits import TEACHER_DIR
from accel.pipeline import default_store, run_recipe
from accel.recipe import load_recipe

PIXELS = 16 * 16  # the digits' dimension
# the frontier's failed run ("before": stage version 1, whose distillation distance was a mean
# over the 256 pixels, i.e. lambda = 2.5 / 256 against the squared norm version 2 takes); every
# other variant changes one thing from it
BEFORE = dict(
    student_steps=4,
    guidance_scale=GUIDANCE,
    learning_rate=5e-5,
    discriminator_learning_rate=2e-4,
    distillation_weight=2.5 / PIXELS,
    r1_weight=1e-5,
)
VARIANTS: dict[str, dict] = {
    "before": {},
    "no R1": {"r1_weight": 0.0},
    "adversarial only": {"distillation_weight": 0.0},
    "distillation only": {"adversarial_weight": 0.0},
    "lambda as ADD's squared norm (x256)": {"distillation_weight": 2.5},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, nargs="+", default=[1])
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/add_ablation.json"))
    args = p.parse_args()
    store = default_store(args.store)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    rows = [r for r in old["rows"] if r["variant"] not in args.variants]
    for name in args.variants:
        config = {**BEFORE, **VARIANTS[name], "iterations": args.iterations}
        with tempfile.TemporaryDirectory() as tmp:
            recipe = Path(tmp) / "recipe.toml"
            recipe.write_text(
                f'name = "add-ablation"\nsource = "{TEACHER_DIR}"\ntarget = "cpu"\n'
                + _stage("add", **config)
            )
            t0 = time.perf_counter()
            (artifact,) = run_recipe(load_recipe(recipe), store, lambda m: print(f"  {m}"))
            wall = time.perf_counter() - t0
        for steps in args.steps:
            row = {
                "variant": name,
                "config": config,
                "train_seconds": artifact.metrics.get("wall_seconds"),
                "wall_seconds_this_run": wall,
                **evaluate(artifact.path, steps, args.seeds, args.n),
            }
            rows.append(row)
            print(f"{name} @ {steps}: FD {row['fd_digits']:.2f} acc {row['class_accuracy']:.3f}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps(
                    {
                        "command": "python benchmarks/add_ablation.py",
                        "iterations": args.iterations,
                        "seeds": args.seeds,
                        "n": args.n,
                        "rows": rows,
                    },
                    indent=2,
                )
                + "\n"
            )


if __name__ == "__main__":
    main()
