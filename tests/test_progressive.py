"""Progressive distillation against the exact Gaussian-mixture teacher."""

import copy

import pytest
import torch

from distill.denoiser import Denoiser
from distill.progressive import ProgressiveConfig, distill_round
from distill.samplers import sample_ddim
from distill.schedule import Schedule

from gmm import PerfectProgressiveStudent, Residual, two_class_gmm


def setup(guidance):
    sched = Schedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    teacher = Denoiser(
        two_class_gmm(sched), sched, "v_prediction", guidance_scale=guidance, null_label=2
    )
    x_T = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(32) % 2
    return sched, teacher, x_T, labels


def test_student_at_half_the_steps_matches_teacher_per_sample():
    for guidance in (1.0, 2.5):
        sched, teacher, x_T, labels = setup(guidance)
        ref = sample_ddim(teacher, x_T, sched.ddim_timesteps(8), labels)
        student = Denoiser(
            PerfectProgressiveStudent(teacher, 4, "v_prediction"), sched, "v_prediction"
        )
        out = sample_ddim(student, x_T, sched.ddim_timesteps(4), labels)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        # a second round: a student of the student, 2 steps for the teacher's 8
        student2 = Denoiser(
            PerfectProgressiveStudent(student, 2, "v_prediction"), sched, "v_prediction"
        )
        torch.testing.assert_close(
            sample_ddim(student2, x_T, sched.ddim_timesteps(2), labels), ref, rtol=1e-6, atol=1e-6
        )
        # and the 4-step teacher itself is measurably worse than the 4-step student
        assert (sample_ddim(teacher, x_T, sched.ddim_timesteps(4), labels) - ref).abs().max() > 1e-2


@pytest.mark.slow
def test_one_round_of_training_closes_the_gap_to_the_teacher():
    sched, gmm_teacher, x_T, labels = setup(1.0)
    teacher = Denoiser(Residual(gmm_teacher.backbone), sched, "v_prediction")
    ref = sample_ddim(teacher, x_T, sched.ddim_timesteps(2), labels)
    before = (sample_ddim(teacher, x_T, sched.ddim_timesteps(1), labels) - ref).pow(2).mean()
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 4, (4096,), generator=g)
    gmm = gmm_teacher.backbone
    x0 = gmm.means[comp] + gmm.stds[comp, None] * torch.randn(
        4096, 4, generator=g, dtype=torch.float64
    )
    config = ProgressiveConfig(
        teacher_steps=2,
        student_steps=1,
        iterations_per_round=300,
        batch_size=128,
        learning_rate=3e-3,
    )
    student, log = distill_round(copy.deepcopy(teacher), (x0, gmm.classes[comp]), 1, config)
    losses = [r["loss"] for r in log]
    after = (sample_ddim(student, x_T, sched.ddim_timesteps(1), labels) - ref).pow(2).mean()
    assert sum(losses[-30:]) < sum(losses[:30])
    assert after < before / 3, (before, after)
