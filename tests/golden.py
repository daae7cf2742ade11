"""Golden figures: short seeded runs of the shipped teachers through the stages, whose figures
(training losses, sampled images) guard refactors that must not change what accel computes
(``tests/test_golden.py``). ``python tests/golden.py`` prints them; the test compares them with
``tests/golden.json``, recorded before the change they guard."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

GOLDEN_FILE = Path(__file__).with_name("golden.json")

# (case, teacher asset, recipe stages, sampling guidance)
CASES = {
    "pixel_consistency": (
        "teacher",
        'stage = "consistency"\nsolver_steps = 10\nnum_inference_steps = 2\n'
        "guidance_scale = 1.5\niterations = 3\nbatch_size = 8\n",
    ),
    "pixel_guidance": (
        "teacher",
        'stage = "guidance"\niterations = 3\nbatch_size = 8\nguidance_min = 1.0\n'
        "guidance_max = 2.0\nguidance_step = 0.5\nguidance_scale = 1.5\n",
    ),
    "pixel_progressive": (
        "teacher",
        'stage = "progressive"\nteacher_steps = 8\nstudent_steps = 4\n'
        "iterations_per_round = 2\nbatch_size = 8\nguidance_scale = 1.5\n",
    ),
    "pixel_adversarial": (
        "teacher",
        'stage = "adversarial"\nstudent_steps = 2\niterations = 2\nbatch_size = 8\n'
        "critic_updates_per_generator = 2\nguidance_scale = 1.5\n",
    ),
    "text_add": (
        "text_teacher",
        'stage = "add"\nstudent_steps = 2\niterations = 2\nbatch_size = 8\nguidance_scale = 1.5\n',
    ),
    "text_consistency": (
        "text_teacher",
        'stage = "consistency"\nsolver_steps = 10\nnum_inference_steps = 2\n'
        "guidance_scale = 1.5\niterations = 3\nbatch_size = 8\n",
    ),
}


def figures(case: str, work: Path) -> dict[str, list[float]]:
    """The losses of ``case``'s training run and its student's samples (8, seed 0): their mean,
    mean absolute value and the first ten pixels of the first."""
    from accel.demo.digits import generate
    from accel.pipeline import default_store, run_recipe
    from accel.recipe import load_recipe
    from export.torch_runtime import open_model

    teacher, stage = CASES[case]
    source = Path(__file__).resolve().parents[1] / "accel" / "assets" / teacher
    recipe = work / f"{case}.toml"
    recipe.write_text(f'name = "{case}"\nsource = "{source}"\ntarget = "cpu"\n[[stages]]\n{stage}')
    (student,) = run_recipe(
        load_recipe(recipe), default_store(work / "store"), progress=lambda m: None
    )
    log = json.loads((student.path / "loss_log.json").read_text())
    losses = list(_numbers(log))
    runtime, plan = open_model(student.path)
    images, _ = generate(runtime, plan, 8, seed=0, num_classes=10)
    return {
        "losses": losses,
        "images": [float(v) for v in (images.mean(), np.abs(images).mean(), *images.ravel()[:10])],
    }


def _numbers(value):
    """The numbers of a loss log (a list of rows, or a dict of them), in order, but its times."""
    if isinstance(value, dict):
        for key in sorted(value):
            if key != "seconds":
                yield from _numbers(value[key])
    elif isinstance(value, list):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield float(value)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = {case: figures(case, Path(tmp)) for case in (sys.argv[1:] or CASES)}
    print(json.dumps(out, indent=1))
