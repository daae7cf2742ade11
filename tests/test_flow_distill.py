"""Flow-matching teachers through progressive and consistency distillation: the Gaussian-mixture
flow teacher (closed-form velocity, exact Euler endpoints) and tiny SD3 pipelines whose students
the stock ``StableDiffusion3Pipeline`` runs with ``FlowMatchEulerDiscreteScheduler`` (progressive)
or ``FlowMatchLCMScheduler`` (consistency)."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from accel.core.model_info import ModelInfo
from distill.consistency import consistency_loss, consistency_pairs
from distill.denoiser import Denoiser, FlowConsistencyDenoiser
from distill.progressive import ProgressiveConfig, distill_round, student_grid
from distill.samplers import flow_grid, sample_ddim
from distill.schedule import Schedule

import families
from gmm import PerfectProgressiveStudent, TimeResidual, two_class_gmm
from tiny import run_cli

FLOW = Schedule(kind="flow", num_train_timesteps=1000, shift=3.0)  # SD3's shift
# accel sample (float32 numpy loop) against the stock pipeline and scheduler: measured at
# most 9e-7 on the tiny SD3 pipeline; 1e-4 leaves room for BLAS differences between machines.
TOLERANCE = 1e-4
PROMPT = "a red circle"


def _setup(guidance):
    teacher = Denoiser(
        two_class_gmm(FLOW, "flow"), FLOW, "flow", guidance_scale=guidance, null_label=2
    )
    x_T = torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return teacher, x_T, torch.arange(32) % 2


def _pairs(grid):
    return list(zip(grid[:-1], grid[1:], strict=True))


def test_flow_grid_is_the_stock_schedulers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher, _, _ = _setup(1.0)
    stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    stock.set_timesteps(4)
    assert flow_grid(teacher, 4) == pytest.approx([float(s) * 1000 for s in stock.sigmas])
    rows = student_grid(teacher, 4)
    assert rows[-1, 2] == 0 and torch.allclose(rows[:, 1], (rows[:, 0] + rows[:, 2]) / 2)


def test_flow_student_at_half_the_steps_matches_the_teachers_euler_per_sample():
    """The student's N Euler steps on its stock grid land exactly where the teacher's 2N Euler
    steps (each student interval halved in sigma) land, with and without guidance; the teacher's
    own N steps do not (so the bound is not met by chance)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for guidance in (1.0, 2.5):
        teacher, x_T, labels = _setup(guidance)
        rows = student_grid(teacher, 4).tolist()
        fine = [pair for t, m, e in rows for pair in ((t, m), (m, e))]
        ref = sample_ddim(teacher, x_T, fine, labels)
        student = Denoiser(PerfectProgressiveStudent(teacher, 4, "flow"), FLOW, "flow")
        out = sample_ddim(student, x_T, _pairs(flow_grid(teacher, 4)), labels)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        coarse = sample_ddim(teacher, x_T, _pairs(flow_grid(teacher, 4)), labels)
        assert (coarse - ref).abs().max() > 1e-2
        # the stock scheduler's loop (set_timesteps, step on the velocity) draws the same, up to
        # its float32 timesteps and arithmetic
        stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        stock.set_timesteps(4)
        x = x_T.clone()
        for t in stock.timesteps:
            v = student.raw(x, torch.tensor(float(t), dtype=torch.float64), labels)
            x = stock.step(v, t, x).prev_sample
        torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_one_round_of_flow_training_closes_the_gap_to_the_teacher():
    gmm_teacher, x_T, labels = _setup(1.0)
    teacher = Denoiser(TimeResidual(gmm_teacher.backbone), FLOW, "flow")
    rows = student_grid(teacher, 1).tolist()
    ref = sample_ddim(teacher, x_T, [(t, m) for t, m, _ in rows] + [(rows[0][1], 0.0)], labels)
    one_step = _pairs(flow_grid(teacher, 1))
    before = (sample_ddim(teacher, x_T, one_step, labels) - ref).pow(2).mean()
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 4, (4096,), generator=g)
    gmm = gmm_teacher.backbone
    x0 = gmm.means[comp] + gmm.stds[comp, None] * torch.randn(
        4096, 4, generator=g, dtype=torch.float64
    )
    config = ProgressiveConfig(
        teacher_steps=2, student_steps=1, iterations_per_round=300, batch_size=128,
        learning_rate=3e-3,
    )  # fmt: skip
    student, log = distill_round(copy.deepcopy(teacher), (x0, gmm.classes[comp]), 1, config)
    losses = [r["loss"] for r in log]
    after = (sample_ddim(student, x_T, one_step, labels) - ref).pow(2).mean()
    assert sum(losses[-30:]) < sum(losses[:30])
    assert after < before / 3, (before, after)


class ChainStudent(nn.Module):
    """The exact consistency function of the teacher's Euler solver on the skipping grid: from
    (z, s_n), the teacher's Euler steps down the grid to 0; as a flow output v = (z - f) / s
    (at s = 0 any v gives f = z)."""

    def __init__(self, teacher: Denoiser, pairs: torch.Tensor):
        super().__init__()
        self.teacher, self.pairs = teacher, pairs

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(len(x))
        out = torch.empty_like(x)
        for value in t.unique():
            rows = t == value
            if value == 0:  # f(z, 0) = z whatever v is
                out[rows] = 0
                continue
            (n,) = torch.nonzero((self.pairs[:, 0] - value).abs() < 1e-9)[0].tolist()
            labels = None if class_labels is None else class_labels[rows]
            f = sample_ddim(self.teacher, x[rows], self.pairs[n:].tolist(), labels)
            out[rows] = (x[rows] - f) / (value / 1000)
        return SimpleNamespace(sample=out)


class Draws:
    """The trainer's random draws (``Trainer.randint``/``randn``), seeded."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)

    def randint(self, high, n):
        return torch.randint(0, high, (n,), generator=self.g)

    def randn(self, shape, dtype):
        return torch.randn(shape, generator=self.g, dtype=dtype)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_flow_consistency_loss_vanishes_at_the_teachers_exact_consistency_function(guidance):
    """The solver's own consistency function (Euler down the stock grid) has loss 0 (to 1e-12)
    on every pair, and one step of it draws the teacher's N-step Euler endpoint exactly; the
    teacher taken as its own consistency function (x0 = z - s v) has a loss over 1e-3."""
    teacher, x_T, labels = _setup(guidance)
    pairs = consistency_pairs(teacher, 8)
    assert pairs[-1, 1] == 0 and torch.equal(pairs[1:, 0], pairs[:-1, 1])
    g = torch.Generator().manual_seed(1)
    comp = torch.randint(0, 4, (64,), generator=g)
    gmm = teacher.backbone
    x0 = gmm.means[comp] + gmm.stds[comp, None] * torch.randn(
        64, 4, generator=g, dtype=torch.float64
    )
    y = gmm.classes[comp]

    def flow_student(backbone, **guidance):
        return FlowConsistencyDenoiser(backbone, FLOW, "flow", solver_steps=8, **guidance)

    exact = flow_student(ChainStudent(teacher, pairs))
    loss = consistency_loss(exact, exact, teacher, x0, y, pairs, "l2", Draws())
    assert loss < 1e-12  # float64 round-off of v = (z - f) / s and back
    naive = flow_student(teacher.backbone, guidance_scale=guidance, null_label=2)
    assert consistency_loss(naive, naive, teacher, x0, y, pairs, "l2", Draws()) > 1e-3
    one_step = exact.predict(x_T, torch.tensor(float(pairs[0, 0])), labels)[0]
    torch.testing.assert_close(
        one_step, sample_ddim(teacher, x_T, pairs.tolist(), labels), rtol=1e-9, atol=1e-9
    )


@pytest.mark.slow
def test_flow_consistency_training_closes_the_gap_to_the_teachers_ode():
    """300 iterations on the Gaussian mixture: the student's 1-step sample moves to within a
    third of the teacher's 1-step Euler error from the teacher's 8-step solver endpoint."""
    from distill.consistency import ConsistencyConfig, distill

    gmm_teacher, x_T, labels = _setup(1.0)
    teacher = Denoiser(TimeResidual(gmm_teacher.backbone), FLOW, "flow")
    pairs = consistency_pairs(teacher, 8)
    ref = sample_ddim(teacher, x_T, pairs.tolist(), labels)
    before = (sample_ddim(teacher, x_T, _pairs(flow_grid(teacher, 1)), labels) - ref).pow(2).mean()
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 4, (4096,), generator=g)
    gmm = gmm_teacher.backbone
    x0 = gmm.means[comp] + gmm.stds[comp, None] * torch.randn(
        4096, 4, generator=g, dtype=torch.float64
    )
    config = ConsistencyConfig(
        solver_steps=8, num_inference_steps=1, iterations=300, batch_size=128,
        learning_rate=3e-3, loss="l2",
    )  # fmt: skip
    student, log = distill(copy.deepcopy(teacher), (x0, gmm.classes[comp]), config)
    assert isinstance(student, FlowConsistencyDenoiser)
    after = (student.predict(x_T, torch.tensor(1000.0), labels)[0] - ref).pow(2).mean()
    losses = [r["loss"] for r in log]
    assert sum(losses[-30:]) < sum(losses[:30])
    assert after < before / 3, (before, after)


METHODS = {  # a few-iteration run's options, and the student's stock scheduler
    "progressive": (
        ["--teacher-steps", 4, "--student-steps", 2, "--iterations-per-round", 2],
        "FlowMatchEulerDiscreteScheduler",
    ),
    "consistency": (
        ["--solver-steps", 10, "--num-inference-steps", 2, "--iterations", 2],
        "FlowMatchLCMScheduler",
    ),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_flow_students_are_stock_pipelines(method, tmp_path, monkeypatch, capsys):
    import diffusers
    import diffusers.schedulers.scheduling_flow_match_lcm as flow_lcm

    options, scheduler = METHODS[method]
    teacher = families.write_pipeline("sd3", tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    student = tmp_path / "student"
    code, _, err = run_cli(
        monkeypatch, capsys, "distill", method, teacher, *options, "--batch-size", 2,
        "--guidance-scale", 2.0, "--dataset", f"prompts:{tmp_path / 'prompts.txt'}",
        "--out", student, "--store", tmp_path / "store",
    )  # fmt: skip
    assert code == 0, err
    info = ModelInfo.read(student)
    assert info.method == method and info.num_inference_steps == 2
    assert info.guidance_scale == 1.0 and info.distilled_guidance_scale == 2.0  # CFG baked in
    if method == "consistency":  # no boundary scalings: x0 = z - s v
        assert info.consistency.sigma_data == 0 and info.consistency.timestep_scaling == 0
    index = json.loads((student / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["scheduler"] == ["diffusers", scheduler]
    out = tmp_path / "s.npz"
    code, _, err = run_cli(monkeypatch, capsys, "sample", student, "--prompt", PROMPT,
                           "--seed", 0, "--out", out)  # fmt: skip
    assert code == 0, err
    ours = np.load(out)
    pipe = families.load_pipeline("sd3", student)
    assert type(pipe) is diffusers.StableDiffusion3Pipeline
    assert type(pipe.scheduler).__name__ == scheduler
    # FlowMatchLCMScheduler.step re-noises with fresh noise: hand it the draws accel sample made
    rng = np.random.default_rng([0, 1])
    monkeypatch.setattr(flow_lcm, "randn_tensor", lambda shape, **kw: torch.from_numpy(
        rng.standard_normal(tuple(shape), dtype=np.float32)))  # fmt: skip
    stock = pipe(
        [PROMPT], latents=torch.from_numpy(ours["latents"]), num_inference_steps=2,
        guidance_scale=1.0, output_type="np", height=32, width=32,
    ).images  # fmt: skip
    assert np.abs(stock - ours["images"].transpose(0, 2, 3, 1)).max() <= TOLERANCE
    weights = next((teacher / "transformer").glob("*.safetensors")).read_bytes()
    assert next((student / "transformer").glob("*.safetensors")).read_bytes() != weights
