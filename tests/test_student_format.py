"""A student directory loads with stock diffusers and its stock scheduler loop reproduces
`accel sample` on the same noise."""

import sys

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel

from accel.cli import main
from distill.denoiser import save_pipeline
from distill.progressive import student_scheduler_config

from tiny import SCHEDULER, tiny_unet


def test_plain_diffusers_loop_reproduces_accel_sample(tmp_path, monkeypatch):
    student = tmp_path / "student"
    save_pipeline(
        student,
        tiny_unet(seed=3),
        student_scheduler_config(SCHEDULER),
        {
            "method": "progressive",
            "num_inference_steps": 4,
            "guidance_scale": 1.0,
            "num_classes": 10,
        },
    )
    out = tmp_path / "s.npz"
    monkeypatch.setattr(
        sys, "argv", ["accel", "sample", str(student), "-n", "20", "--seed", "7", "--out", str(out)]
    )
    main()
    ours = np.load(out)

    pipe = DiffusionPipeline.from_pretrained(student)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDIMScheduler)
    unet = UNet2DModel.from_pretrained(student, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(student, subfolder="scheduler")
    scheduler.set_timesteps(4)
    x = torch.from_numpy(
        np.random.default_rng(7).standard_normal((20, 1, 16, 16)).astype(np.float32)
    )
    labels = torch.arange(20) % 10
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
    reference = ((x.clamp(-1, 1) + 1) / 2).numpy()
    assert np.abs(ours["images"] - reference).max() <= 1e-4
    assert ours["labels"].tolist() == labels.tolist()
