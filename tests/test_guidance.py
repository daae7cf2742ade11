"""Guidance distillation: on the exact GMM teacher the one-pass w-conditioned student reproduces
the classifier-free-guided teacher; the stage's student loads with stock diffusers, exports with w as
a graph input and chains into progressive distillation."""

import numpy as np
import pytest
import torch

from distill.denoiser import Denoiser
from distill.guidance import GuidanceConfig, distill
from distill.samplers import sample_ddim
from distill.schedule import Schedule

from gmm import TimeResidual, two_class_gmm
from tiny import SCHEDULER, write_tiny_pipeline


@pytest.mark.slow
def test_w_conditioned_student_matches_the_guided_teacher():
    sched = Schedule.from_config(SCHEDULER)
    gmm = two_class_gmm(sched)
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 4, (4096,), generator=g)
    x0 = gmm.means[comp] + gmm.stds[comp, None] * torch.randn(4096, 4, generator=g).double()
    config = GuidanceConfig(
        guidance_min=1.0,
        guidance_max=3.0,
        guidance_step=1.0,
        guidance_scale=2.0,
        iterations=1000,
        batch_size=256,
        learning_rate=2e-3,
        checkpoint_every=0,
    )
    scales = config.scales()
    teacher = Denoiser(gmm, sched, "v_prediction", null_label=2)
    backbone = TimeResidual(gmm, labels=3 * len(scales))  # zero correction: unguided at every w
    student, _ = distill(teacher, backbone, 3, (x0, gmm.classes[comp]), config)

    x_T = torch.randn(512, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(512) % 2
    steps = sched.ddim_timesteps(20)
    for w in scales[1:]:
        guided = Denoiser(gmm, sched, "v_prediction", guidance_scale=w, null_label=2)
        ref = sample_ddim(guided, x_T, steps, labels)
        before = sample_ddim(Denoiser(gmm, sched, "v_prediction"), x_T, steps, labels) - ref
        one_pass = Denoiser(student.backbone, sched, "v_prediction", w, None, scales, 3)
        after = sample_ddim(one_pass, x_T, steps, labels) - ref
        err, ref_err = after.pow(2).mean().item(), before.pow(2).mean().item()
        print(w, ref_err, err)
        assert err < ref_err / 10, (w, ref_err, err)


@pytest.mark.slow  # a training chain into an engine (~25 s); make test-slow runs it
def test_guidance_stage_exports_w_as_an_input_and_chains_into_progressive(tmp_path):
    from diffusers import DDIMScheduler, UNet2DModel

    from accel.demo.digits import generate
    from accel.pipeline import default_store, run_recipe
    from accel.recipe import load_recipe
    from accel.runtime import open_engine
    from export.torch_runtime import open_model

    write_tiny_pipeline(tmp_path / "teacher")
    (tmp_path / "r.toml").write_text(
        'name = "gd"\nsource = "teacher"\ntarget = "cpu"\n'
        '[[stages]]\nstage = "guidance"\nguidance_step = 0.5\nguidance_scale = 2.0\n'
        "iterations = 2\nbatch_size = 4\n"
        '[[stages]]\nstage = "progressive"\nteacher_steps = 4\nstudent_steps = 2\n'
        "guidance_scale = 2.0\niterations_per_round = 2\nbatch_size = 4\n"
        '[[stages]]\nstage = "onnx"\n[[stages]]\nstage = "ort"\n'
    )
    guided, student, _, engine = run_recipe(
        load_recipe(tmp_path / "r.toml"), default_store(tmp_path / "s"), progress=lambda m: None
    )
    unet = UNet2DModel.from_pretrained(guided.path, subfolder="unet")
    assert unet.config.num_class_embeds == 11 * 5  # one row per (label, w) on 1, 1.5, ..., 3
    assert DDIMScheduler.from_pretrained(student.path, subfolder="scheduler")
    ort_rt, plan = open_engine(engine.path)
    assert "guidance_scale" in ort_rt.inputs() and plan.guidance_input
    assert plan.guidance_scale == 2.0 and len(plan.steps) == 2
    torch_rt, torch_plan = open_model(student.path)
    a, _ = generate(torch_rt, torch_plan, 6, seed=1, num_classes=10)
    b, _ = generate(ort_rt, plan, 6, seed=1, num_classes=10)
    assert np.abs(a - b).max() < 1e-3
    # w is live: another grid point gives other samples from the same engine
    other = type(plan)(**{**plan.__dict__, "guidance_scale": 3.0})
    c, _ = generate(ort_rt, other, 6, seed=1, num_classes=10)
    assert np.abs(c - b).max() > 1e-4
