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
from gmm import PerfectProgressiveStudent, TimeResidual, mixture, one_step_score, two_class_gmm
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


@pytest.mark.slow
def test_flow_dmd2_one_step_student_matches_themixture():
    """DMD2 in flow form on the closed-form flow teacher: the 1-step student (x0 = z - v at s = 1)
    starts at the class means (sliced W1 ~0.75 from the data) and ends within 0.15 of the
    mixture, every component holding its share of its class (two true sample sets: ~0.05)."""
    from distill.dmd import AdversarialConfig, distill

    torch.manual_seed(0)  # the critic's and the discriminator head's init
    gmm = two_class_gmm(FLOW, "flow")
    teacher = Denoiser(TimeResidual(gmm), FLOW, "flow")  # zero correction: exact
    g = torch.Generator().manual_seed(0)
    data = mixture(gmm, 4096, g)
    n = 2000
    labels = torch.arange(n) % 2
    x_T = torch.randn(n, 4, generator=g, dtype=torch.float64)

    def score(model):
        return one_step_score(model, x_T, labels, data, gmm, 1000.0)

    before, _ = score(FlowConsistencyDenoiser(teacher.backbone, FLOW, "flow", solver_steps=1))
    config = AdversarialConfig(
        student_steps=1, iterations=2000, batch_size=128, learning_rate=2e-3,
        feature_module="net.3", adam_betas=(0.0, 0.99), weight_decay=0.0, checkpoint_every=0,
    )  # fmt: skip
    student, log = distill(teacher, teacher.backbone, data, config)
    assert isinstance(student, FlowConsistencyDenoiser)
    after, shares = score(student)
    assert after < 0.15 and after < before / 4, (before, after)
    assert min(shares) > 0.4, shares


@pytest.mark.slow
def test_flow_guidance_student_matches_the_guided_flow_teacher():
    """Guidance distillation's velocity loss on the closed-form flow teacher: the one-pass
    w-conditioned student's 20-step Euler samples land within a tenth (in squared error) of the
    unguided teacher's distance from the guided teacher's, at every w of the grid (measured with
    this seed: 1/39 at w 2, 1/32 at w 3; 1/13 to 1/35 over init seeds 0-2)."""
    from distill.guidance import GuidanceConfig, distill

    gmm = two_class_gmm(FLOW, "flow")
    g = torch.Generator().manual_seed(0)
    data = mixture(gmm, 4096, g)
    config = GuidanceConfig(
        guidance_min=1.0, guidance_max=3.0, guidance_step=1.0, guidance_scale=2.0,
        iterations=3000, batch_size=256, learning_rate=1e-3, checkpoint_every=0,
    )  # fmt: skip
    scales = config.scales()
    teacher = Denoiser(gmm, FLOW, "flow", null_label=2)
    torch.manual_seed(0)  # the correction's init
    student, _ = distill(teacher, TimeResidual(gmm, labels=3 * len(scales)), 3, data, config)
    x_T = torch.randn(512, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(512) % 2
    steps = _pairs(flow_grid(teacher, 20))
    for w in scales[1:]:
        ref = sample_ddim(Denoiser(gmm, FLOW, "flow", w, 2), x_T, steps, labels)
        before = (sample_ddim(Denoiser(gmm, FLOW, "flow"), x_T, steps, labels) - ref).pow(2)
        one_pass = Denoiser(student.backbone, FLOW, "flow", w, None, scales, 3)
        after = (sample_ddim(one_pass, x_T, steps, labels) - ref).pow(2)
        assert after.mean() < before.mean() / 10, (w, before.mean(), after.mean())


METHODS = {  # a few-iteration run's options, and the student's stock scheduler
    "progressive": (
        ["--teacher-steps", 4, "--student-steps", 2, "--iterations-per-round", 2],
        "FlowMatchEulerDiscreteScheduler",
    ),
    "consistency": (
        ["--solver-steps", 10, "--num-inference-steps", 2, "--iterations", 2],
        "FlowMatchLCMScheduler",
    ),
    "adversarial": (["--student-steps", 2, "--iterations", 3], "FlowMatchLCMScheduler"),
    # sCM: sampled at SCMScheduler's TrigFlow grid, handed to the stock pipeline as sigmas
    "scm": (["--num-inference-steps", 2, "--iterations", 2], "FlowMatchLCMScheduler"),
    # ADD in LADD's form (discriminator on the teacher's middle block at noised latents)
    "add": (["--method", "add", "--student-steps", 2, "--iterations", 2], "FlowMatchLCMScheduler"),
    "guidance": (["--iterations", 2, "--guidance-scale", 2.0], "FlowMatchEulerDiscreteScheduler"),
}
CASES = [("sd3", m) for m in METHODS if m != "guidance"] + [("flux", m) for m in METHODS]
# PixArt-Sigma: a DDPM (epsilon, learned variance) transformer: LCM-form students (progressive
# refuses epsilon teachers whose schedule ends near SNR 0, as for SD 1.5)
CASES += [("pixart_sigma", m) for m in ("consistency", "adversarial")]
CASES += [("sana", m) for m in METHODS if m != "guidance"]  # a flow model, as SD3
DISCRETE_SCHEDULERS = {
    "FlowMatchEulerDiscreteScheduler": "DDIMScheduler",
    "FlowMatchLCMScheduler": "LCMScheduler",
}
STOCK_CLASSES = {
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "pixart_sigma": "PixArtSigmaPipeline",
    "sana": "SanaPipeline",
}
W = 2.0  # the guidance every student learns


def _flux_schnell(path):
    """The tiny Flux pipeline without the guidance embedding (FLUX.1-schnell's form): the
    guidance stage's teacher."""
    from diffusers import FluxTransformer2DModel

    pipe = families.build_pipeline("flux", 0)
    dev = pipe.transformer
    pipe.transformer = FluxTransformer2DModel.from_config({**dev.config, "guidance_embeds": False})
    state = {k: v for k, v in dev.state_dict().items() if "guidance_embedder" not in k}
    pipe.transformer.load_state_dict(state)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize(("family", "method"), CASES)
def test_flow_students_are_stock_pipelines(family, method, tmp_path, monkeypatch, capsys):
    """Each flow method's student of the tiny SD3 and Flux (FLUX.1-dev form: w an input)
    pipelines loads in the stock pipeline with the method's scheduler and draws what
    ``accel sample`` draws from the same latents (and, for consistency/DMD2 students, the same
    re-noising draws)."""
    import diffusers
    import diffusers.schedulers.scheduling_flow_match_lcm as flow_lcm
    import diffusers.schedulers.scheduling_lcm as lcm

    options, scheduler = METHODS[method]
    if family == "pixart_sigma":
        scheduler = DISCRETE_SCHEDULERS[scheduler]
    if method == "guidance":
        teacher = _flux_schnell(tmp_path / "teacher")
    else:
        teacher = families.write_pipeline(family, tmp_path / "teacher")
        options = [*options, "--guidance-scale", W]
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    student = tmp_path / "student"
    code, _, err = run_cli(
        monkeypatch, capsys, "distill", {"add": "adversarial"}.get(method, method), teacher,
        *options, "--batch-size", 2,
        "--dataset", f"prompts:{tmp_path / 'prompts.txt'}", "--out", student,
        "--store", tmp_path / "store",
    )  # fmt: skip
    assert code == 0, err
    info = ModelInfo.read(student)
    assert info.method == {"adversarial": "dmd2"}.get(method, method)
    w_input = family == "flux"  # Flux-dev and guidance students take w; SD3 bakes CFG in
    if w_input:
        assert info.guidance_scale == W and info.distilled_guidance_scale is None
    else:
        assert info.guidance_scale == 1.0 and info.distilled_guidance_scale == W
    if info.consistency is not None and family != "pixart_sigma":  # flow: x0 = z - s v
        assert info.consistency.sigma_data == 0 and info.consistency.timestep_scaling == 0
    index = json.loads((student / "model_index.json").read_text())
    stock_class = STOCK_CLASSES[family]
    assert index["_class_name"] == stock_class
    assert index["scheduler"] == ["diffusers", scheduler]
    steps = 2
    out = tmp_path / "s.npz"
    h, w = families.RESOLUTION[family]
    code, _, err = run_cli(monkeypatch, capsys, "sample", student, "--prompt", PROMPT,
                           "--steps", steps, "--seed", 0, "--height", h, "--width", w,
                           "--out", out)  # fmt: skip
    assert code == 0, err
    ours = np.load(out)
    pipe = families.load_pipeline(family, student)
    assert type(pipe) is getattr(diffusers, stock_class)
    assert type(pipe.scheduler).__name__ == scheduler
    if method == "guidance":
        assert pipe.transformer.config.guidance_embeds  # w through FLUX.1-dev's embedding
    # FlowMatchLCMScheduler.step re-noises with fresh noise: hand it the draws accel sample made
    rng = np.random.default_rng([0, 1])
    for module in (flow_lcm, lcm):
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(
            rng.standard_normal(tuple(shape), dtype=np.float32)))  # fmt: skip
    extra = families.stock_kwargs(family)  # accel runs the stock defaults (T5/Gemma lengths,
    extra.pop("max_sequence_length", None)  # Sana's instruction)
    extra.pop("complex_human_instruction", None)
    if method == "scm":
        from distill.students import scm_flow_grid

        extra["sigmas"] = [v / 1000 for v in scm_flow_grid(steps, 1000)[:-1]]
    stock = pipe(
        [PROMPT], latents=torch.from_numpy(ours["latents"]), num_inference_steps=steps,
        guidance_scale=W if w_input else 1.0, output_type="np", **extra,
    ).images  # fmt: skip
    assert np.abs(stock - ours["images"].transpose(0, 2, 3, 1)).max() <= TOLERANCE
    weights = next((teacher / "transformer").glob("*.safetensors")).read_bytes()
    assert next((student / "transformer").glob("*.safetensors")).read_bytes() != weights


def test_a_sana_scm_student_runs_in_sana_sprint_with_scm_scheduler(tmp_path, monkeypatch, capsys):
    """SANA-Sprint's own pipeline and sampler: a Sana sCM student, through
    ``load_sana_sprint_pipeline`` (guidance embedding with zero output, the time projection's
    scale, sigma_data 1), draws what ``accel sample`` draws at 1, 2 and 4 steps from the same
    latents and re-noising draws; without the scale it does not."""
    import diffusers.schedulers.scheduling_scm as scm_module
    from diffusers import SanaSprintPipeline, SCMScheduler

    from distill.students import load_sana_sprint_pipeline

    teacher = families.write_pipeline("sana", tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    student = tmp_path / "student"
    code, _, err = run_cli(
        monkeypatch, capsys, "distill", "scm", teacher, "--num-inference-steps", 2,
        "--iterations", 2, "--guidance-scale", W, "--batch-size", 2,
        "--dataset", f"prompts:{tmp_path / 'prompts.txt'}", "--out", student,
        "--store", tmp_path / "store",
    )  # fmt: skip
    assert code == 0, err
    pipe = load_sana_sprint_pipeline(student)
    assert type(pipe) is SanaSprintPipeline and type(pipe.scheduler) is SCMScheduler
    h, w = families.RESOLUTION["sana"]

    def stock(pipe, latents, steps):
        rng = np.random.default_rng([0, 1])  # the re-noising draws accel sample made
        monkeypatch.setattr(scm_module, "randn_tensor", lambda shape, **kw: torch.from_numpy(
            rng.standard_normal(tuple(shape), dtype=np.float32)))  # fmt: skip
        return pipe(
            [PROMPT], latents=torch.from_numpy(latents), num_inference_steps=steps,
            intermediate_timesteps=1.3 if steps == 2 else None, height=h, width=w,
            use_resolution_binning=False, output_type="np",
        ).images  # fmt: skip

    for steps in (1, 2, 4):
        out = tmp_path / f"s{steps}.npz"
        code, _, err = run_cli(monkeypatch, capsys, "sample", student, "--prompt", PROMPT,
                               "--steps", steps, "--seed", 0, "--height", h, "--width", w,
                               "--out", out)  # fmt: skip
        assert code == 0, err
        ours = np.load(out)
        ref = ours["images"].transpose(0, 2, 3, 1)
        assert np.abs(stock(pipe, ours["latents"], steps) - ref).max() <= TOLERANCE, steps
    pipe.transformer.time_embed.time_proj.scale = 1  # SANA-Sprint's own time convention
    assert np.abs(stock(pipe, ours["latents"], 4) - ref).max() > 100 * TOLERANCE
    with pytest.raises(Exception, match="not a Sana sCM student"):
        load_sana_sprint_pipeline(teacher)


@pytest.mark.parametrize("family", ["sd3", "pixart_sigma", "sana"])
def test_guidance_refuses_families_without_a_w_input_in_one_line(
    family, tmp_path, monkeypatch, capsys
):
    teacher = families.write_pipeline(family, tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    capsys.readouterr()
    code, _, err = run_cli(
        monkeypatch, capsys, "distill", "guidance", teacher, "--iterations", 1,
        "--dataset", f"prompts:{tmp_path / 'prompts.txt'}", "--out", tmp_path / "out",
        "--store", tmp_path / "store",
    )  # fmt: skip
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "needs a w input that the stock pipeline feeds" in err and "progressive" in err
    assert not (tmp_path / "out").exists()
