"""Consistency distillation: LCMScheduler's scalings and loop, and the exact GMM teacher."""

import copy

import pytest
import torch
from diffusers import LCMScheduler

from distill.consistency import (
    ConsistencyConfig,
    consistency_grid,
    distill,
    sample_consistency,
)
from distill.denoiser import ConsistencyDenoiser, Denoiser
from distill.parameterisation import boundary_scalings
from distill.samplers import sample_ddim
from distill.schedule import Schedule

from gmm import Residual, two_class_gmm
from tiny import SCHEDULER, tiny_unet


def test_scalings_and_grid_match_lcm_scheduler():
    lcm = LCMScheduler(
        **{k: v for k, v in SCHEDULER.items() if not k.startswith("_") and k != "clip_sample"}
    )
    for t in (0, 19, 259, 999):
        ours = boundary_scalings(torch.tensor(t))
        ref = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert abs(ours[0].item() - ref[0]) < 1e-12 and abs(ours[1].item() - ref[1]) < 1e-12
    assert boundary_scalings(torch.tensor(0)) == (1.0, 0.0)  # f(x, 0) = x exactly
    lcm.set_timesteps(50, original_inference_steps=50)
    assert lcm.timesteps.tolist() == consistency_grid(1000, 50)[::-1]


def test_lcm_scheduler_loop_reproduces_multistep_consistency_sampling():
    sched = Schedule.from_config(SCHEDULER)
    unet = tiny_unet(seed=5)
    student = ConsistencyDenoiser(unet, sched, "v_prediction")
    lcm = LCMScheduler(
        **{k: v for k, v in SCHEDULER.items() if not k.startswith("_") and k != "clip_sample"}
    )
    lcm.set_timesteps(4)
    x_T = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6) % 10
    ours = sample_consistency(
        student, x_T, lcm.timesteps.tolist(), labels, torch.Generator().manual_seed(1)
    )
    x, g = x_T, torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in lcm.timesteps:
            x, denoised = lcm.step(
                unet(x, t, class_labels=labels).sample, t, x, generator=g, return_dict=False
            )
    torch.testing.assert_close(ours, denoised, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_one_step_endpoints_move_toward_exact_ode_endpoints():
    sched = Schedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    gmm = two_class_gmm(sched)
    teacher = Denoiser(Residual(gmm), sched, "v_prediction")
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(64, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(64) % 2
    exact = sample_ddim(teacher, x_T, sched.ddim_timesteps(1000), labels)  # the PF-ODE endpoint

    def one_step_error(model):
        return (sample_consistency(model, x_T, [999], labels) - exact).pow(2).mean()

    comp = torch.randint(0, 4, (4096,), generator=g)
    x0 = gmm.means[comp] + gmm.stds[comp, None] * torch.randn(
        4096, 4, generator=g, dtype=torch.float64
    )
    before = one_step_error(
        ConsistencyDenoiser(copy.deepcopy(teacher.backbone), sched, "v_prediction")
    )
    config = ConsistencyConfig(
        solver_steps=20,
        iterations=400,
        batch_size=128,
        learning_rate=3e-3,
        ema_decay=0.9,
        loss="l2",
    )
    student, _ = distill(teacher, (x0, gmm.classes[comp]), config)
    after = one_step_error(student)
    assert after < before / 2, (before, after)


@pytest.mark.slow  # a training chain into an engine (~25 s); make test-slow runs it
def test_consistency_stage_to_engine_samples_like_torch(tmp_path):
    """The stage writes an LCMScheduler student; its ONNX engine carries the boundary condition and
    matches the torch student (the onnx and ort stages check parity themselves)."""
    import numpy as np

    from accel.demo.digits import generate
    from accel.pipeline import default_store, run_recipe
    from accel.recipe import load_recipe
    from accel.runtime import open_engine
    from export.torch_runtime import open_model

    from tiny import write_tiny_pipeline

    write_tiny_pipeline(tmp_path / "teacher")
    (tmp_path / "r.toml").write_text(
        'name = "cm"\nsource = "teacher"\ntarget = "cpu"\n'
        '[[stages]]\nstage = "consistency"\nsolver_steps = 10\nnum_inference_steps = 2\n'
        "guidance_scale = 2.0\niterations = 3\nbatch_size = 4\n"
        '[[stages]]\nstage = "onnx"\n[[stages]]\nstage = "ort"\n'
    )
    student, _, engine = run_recipe(
        load_recipe(tmp_path / "r.toml"), default_store(tmp_path / "s"), progress=lambda m: None
    )
    assert (
        LCMScheduler.from_pretrained(
            student.path, subfolder="scheduler"
        ).config.original_inference_steps
        == 10
    )
    torch_rt, torch_plan = open_model(student.path)
    ort_rt, ort_plan = open_engine(engine.path)
    assert [s.timestep for s in ort_plan.steps] == [999, 499] and ort_plan.steps[0].c > 0
    a, _ = generate(torch_rt, torch_plan, 8, seed=3, num_classes=10)
    b, _ = generate(ort_rt, ort_plan, 8, seed=3, num_classes=10)
    assert np.abs(a - b).max() < 1e-3
