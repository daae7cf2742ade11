"""Progressive distillation against the exact Gaussian-mixture teacher."""

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.denoiser import Denoiser, from_x0_eps
from distill.progressive import ProgressiveConfig, distill_round, progressive_target, student_grid
from distill.samplers import sample_ddim
from distill.schedule import Schedule, _bcast

from gmm import Residual, two_class_gmm


class PerfectStudent(nn.Module):
    """A student that outputs exactly its progressive regression target."""

    def __init__(self, teacher: Denoiser, student_steps: int):
        super().__init__()
        self.teacher, self.rows = teacher, student_grid(teacher, student_steps)

    def forward(self, x, t, class_labels=None):
        sched = self.teacher.schedule
        t = torch.as_tensor(t).expand(len(x))
        (row,) = self.rows[self.rows[:, 0] == t[0]]  # sampled on the student's grid only
        t_mid, t_end = (row[i].expand(len(x)) for i in (1, 2))
        x0 = progressive_target(self.teacher, x, t, t_mid, t_end, class_labels)
        alpha, sigma = (_bcast(v, x) for v in sched.alpha_sigma(t))
        return SimpleNamespace(
            sample=from_x0_eps(x0, (x - alpha * x0) / sigma, alpha, sigma, "v_prediction")
        )


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
        student = Denoiser(PerfectStudent(teacher, 4), sched, "v_prediction")
        out = sample_ddim(student, x_T, sched.ddim_timesteps(4), labels)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        # a second round: a student of the student, 2 steps for the teacher's 8
        student2 = Denoiser(PerfectStudent(student, 2), sched, "v_prediction")
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
