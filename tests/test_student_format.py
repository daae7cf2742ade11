"""Every kind of student directory loads with stock diffusers, and a plain loop of its stock
scheduler reproduces `accel sample` on the same noise (max abs diff <= 1e-4)."""

import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, LCMScheduler, UNet2DModel

from accel.cli import main
from accel.core.model_info import ModelInfo
from distill.checkpoint import save_pipeline
from distill.parameterisation import TIMESTEP_SCALING
from distill.students import ddim_scheduler_config as ddim_config
from distill.students import lcm_scheduler_config as lcm_config

from tiny import SCHEDULER, tiny_unet

SCALES = [1.0, 1.5, 2.0]
STUDENTS = {
    # method: (scheduler config, accel.json, steps)
    "progressive": (ddim_config(SCHEDULER), {"num_inference_steps": 4, "guidance_scale": 1.0}),
    "consistency": (
        lcm_config(SCHEDULER, 10),
        {
            "num_inference_steps": 4,
            "guidance_scale": 1.0,
            "consistency": {"solver_steps": 10, "timestep_scaling": TIMESTEP_SCALING},
        },
    ),
    "dmd2": (
        lcm_config(SCHEDULER, 4),
        {
            "num_inference_steps": 2,
            "guidance_scale": 1.0,
            "consistency": {"solver_steps": 4, "timestep_scaling": TIMESTEP_SCALING},
        },
    ),
    "add": (  # written by the same code as DMD2's students
        lcm_config(SCHEDULER, 4),
        {
            "num_inference_steps": 4,
            "guidance_scale": 1.0,
            "consistency": {"solver_steps": 4, "timestep_scaling": TIMESTEP_SCALING},
        },
    ),
    "guidance": (
        ddim_config(SCHEDULER),
        {
            "guidance_scale": 1.5,
            "guidance_embedding": {"scales": SCALES, "num_labels": 11},
        },
    ),
}


@pytest.mark.parametrize("method", list(STUDENTS))
def test_plain_diffusers_loop_reproduces_accel_sample(tmp_path, monkeypatch, method):
    scheduler_config, info = STUDENTS[method]
    w_rows = len(SCALES) if "guidance_embedding" in info else 1
    student = tmp_path / "student"
    save_pipeline(
        student,
        tiny_unet(seed=3, num_class_embeds=11 * w_rows),
        scheduler_config,
        ModelInfo(method=method, num_classes=10, **info),
    )
    steps = info.get("num_inference_steps", 6)
    out = tmp_path / "s.npz"
    monkeypatch.setattr(
        sys,
        "argv",
        ["accel", "sample", str(student), "-n", "20", "--seed", "7", "--steps", str(steps)]
        + ["--out", str(out)],
    )
    main()
    ours = np.load(out)

    pipe = DiffusionPipeline.from_pretrained(student)
    assert isinstance(pipe.unet, UNet2DModel)
    unet = UNet2DModel.from_pretrained(student, subfolder="unet").eval()
    cls = LCMScheduler if "consistency" in info else DDIMScheduler
    scheduler = cls.from_pretrained(student, subfolder="scheduler")
    assert type(pipe.scheduler) is cls
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(
        np.random.default_rng(7).standard_normal((20, 1, 16, 16)).astype(np.float32)
    )
    labels = torch.arange(20) % 10
    if w_rows > 1:  # a guidance-distilled student: class id = label + 11 * (index of w)
        labels = labels + 11 * SCALES.index(info["guidance_scale"])
    # LCMScheduler draws its re-noising from randn_tensor: give it accel's step noise
    step_noise = np.random.default_rng([7, 1])
    monkeypatch.setattr(
        "diffusers.schedulers.scheduling_lcm.randn_tensor",
        lambda shape, **kw: torch.from_numpy(step_noise.standard_normal(shape, dtype=np.float32)),
    )
    with torch.no_grad():
        for t in scheduler.timesteps:
            step = scheduler.step(unet(x, t, class_labels=labels).sample, t, x)
            x = step.prev_sample
    if cls is LCMScheduler:
        x = step.denoised  # the last consistency step returns x0
    reference = ((x.clamp(-1, 1) + 1) / 2).numpy()
    assert np.abs(ours["images"] - reference).max() <= 1e-4
    assert ours["labels"].tolist() == (torch.arange(20) % 10).tolist()
