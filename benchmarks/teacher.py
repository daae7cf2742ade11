"""A shipped teacher's quality: FD-digits and class accuracy of its DDIM sampler against the
floor (FD between two disjoint halves of the real digits), per guidance scale and step count.
For the text-to-image teacher (``--model accel/assets/text_teacher``) the class accuracy is the
prompt accuracy: images of "a handwritten seven" the digits classifier calls a seven.

    python benchmarks/teacher.py [--model DIR] [--guidance 1 2 3] [--steps 4 8 16 50]
        [--seeds 0 1] [--n 1000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from accel.demo.digits import TEACHER_DIR, evaluate_images, fd_floor, generate
from export.torch_runtime import open_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=TEACHER_DIR)
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0])
    p.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16, 50])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher.json"))
    args = p.parse_args()
    rows = []
    for w in args.guidance:
        for steps in args.steps:
            runtime, plan = open_model(args.model, steps=steps, guidance=w)
            t0 = time.perf_counter()
            per_seed = [
                evaluate_images(*generate(runtime, plan, args.n, s, plan.num_classes))
                for s in args.seeds
            ]
            row = {
                "guidance_scale": w,
                "steps": steps,
                "fd_digits": float(np.mean([r["fd_digits"] for r in per_seed])),
                "class_accuracy": float(np.mean([r["class_accuracy"] for r in per_seed])),
                "per_seed": per_seed,
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            print(
                f"w={w} steps={steps}: FD-digits {row['fd_digits']:.3f}, "
                f"accuracy {row['class_accuracy']:.4f} ({row['seconds']:.0f}s)",
                flush=True,
            )
    floor = [fd_floor(s) for s in args.seeds]
    print(f"FD floor (two halves of the real digits): {np.mean(floor):.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/teacher.py "
                + " ".join(
                    f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(args).items()
                    if k != "out"
                ),
                "n": args.n,
                "seeds": args.seeds,
                "fd_floor": float(np.mean(floor)),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
