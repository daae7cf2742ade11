"""DMD2 on the exact Gaussian-mixture teacher: the one-step student covers every component and its
samples approach the mixture in sliced-Wasserstein distance."""

import pytest
import torch

from distill.denoiser import ConsistencyDenoiser, Denoiser
from distill.dmd import AdversarialConfig, distill
from distill.schedule import Schedule

from gmm import TimeResidual, mixture, one_step_score, sliced_wasserstein, two_class_gmm
from tiny import SCHEDULER


@pytest.mark.slow
def test_dmd2_one_step_student_covers_every_component():
    sched = Schedule.from_config(SCHEDULER)
    gmm = two_class_gmm(sched)
    teacher = Denoiser(TimeResidual(gmm), sched, "v_prediction")  # zero correction: exact
    g = torch.Generator().manual_seed(0)
    data = mixture(gmm, 4096, g)
    n = 2000
    labels = torch.arange(n) % 2
    x_T = torch.randn(n, 4, generator=g, dtype=torch.float64)

    def score(model):
        return one_step_score(model, x_T, labels, data, gmm, 999)

    before, _ = score(ConsistencyDenoiser(teacher.backbone, sched, "v_prediction", solver_steps=1))
    config = AdversarialConfig(
        student_steps=1,
        iterations=1000,
        batch_size=128,
        learning_rate=2e-3,
        feature_module="net.3",
        adam_betas=(0.0, 0.99),  # no momentum: the toy's short min-max game settles faster
        weight_decay=0.0,
        checkpoint_every=0,
    )
    student, log = distill(teacher, teacher.backbone, data, config)
    after, shares = score(student)
    floor = sliced_wasserstein(mixture(gmm, n // 2, g)[0], mixture(gmm, n // 2, g)[0])
    # before: every sample at its class mean (~0.75); two true sample sets differ by ~0.05
    assert after < 0.15 and after < before / 4, (before, after, floor)
    assert min(shares) > 0.4, shares  # each component holds half of its class


@pytest.mark.slow  # a training chain into an engine (~25 s); make test-slow runs it
def test_recipe_chains_progressive_rounds_into_an_adversarial_fine_tune(tmp_path):
    """progressive 4 -> 2, progressive 2 -> 1 on its student, DMD2 fine-tune of that student
    against the recipe's teacher, then an engine: the guidance baked in travels along."""
    import json

    from accel.pipeline import default_store, run_recipe
    from accel.recipe import load_recipe
    from accel.runtime import open_engine

    from tiny import write_tiny_pipeline

    write_tiny_pipeline(tmp_path / "teacher")
    (tmp_path / "r.toml").write_text(
        'name = "chain"\nsource = "teacher"\ntarget = "cpu"\n'
        '[[stages]]\nstage = "progressive"\nteacher_steps = 4\nstudent_steps = 2\n'
        "guidance_scale = 2.0\niterations_per_round = 2\nbatch_size = 4\n"
        '[[stages]]\nstage = "progressive"\nteacher_steps = 2\nstudent_steps = 1\n'
        "iterations_per_round = 2\nbatch_size = 4\n"
        '[[stages]]\nstage = "adversarial"\nstudent_steps = 1\nguidance_scale = 2.0\n'
        "iterations = 3\nbatch_size = 4\n"
        '[[stages]]\nstage = "onnx"\n[[stages]]\nstage = "ort"\n'
    )
    *_, dmd, _, engine = run_recipe(
        load_recipe(tmp_path / "r.toml"), default_store(tmp_path / "s"), progress=lambda m: None
    )
    info = json.loads((dmd.path / "accel.json").read_text())
    assert info["method"] == "dmd2" and info["distilled_guidance_scale"] == 2.0
    assert [s.timestep for s in open_engine(engine.path)[1].steps] == [999]
    log = json.loads((dmd.path / "loss_log.json").read_text())
    assert len(log) == 3 and {"dmd", "fake", "gan_generator", "gan_critic"} <= set(log[0])


def test_progressive_refuses_a_student_of_another_step_count(tmp_path):
    from accel.core.errors import StageError
    from accel.pipeline import default_store, run_recipe
    from accel.recipe import load_recipe

    from tiny import write_tiny_pipeline

    write_tiny_pipeline(tmp_path / "teacher")
    (tmp_path / "r.toml").write_text(
        'name = "chain"\nsource = "teacher"\ntarget = "cpu"\n'
        '[[stages]]\nstage = "progressive"\nteacher_steps = 4\nstudent_steps = 2\n'
        "iterations_per_round = 1\nbatch_size = 2\n"
        '[[stages]]\nstage = "progressive"\nteacher_steps = 8\nstudent_steps = 4\n'
        "iterations_per_round = 1\nbatch_size = 2\n"
    )
    with pytest.raises(StageError, match="set teacher_steps = 2"):
        run_recipe(
            load_recipe(tmp_path / "r.toml"), default_store(tmp_path / "s"), progress=lambda m: None
        )
