"""MeanFlow flow maps (``distill.meanflow``): the identity on an exact Gaussian flow map, the
distilled student on the Gaussian mixture against the teacher's exact ODE, and students of the tiny
SD3 / Sana / Flux pipelines in the stock pipeline with ``FlowMapEulerDiscreteScheduler``, through
ONNX and a bundle with their ``r_timestep`` input."""

import copy
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from distill.denoiser import Denoiser
from distill.meanflow import MeanFlowConfig, average_velocity, meanflow_loss
from distill.schedule import Schedule
from distill.students import (
    ATTR,
    INTERVAL_FILE,
    FlowMapDenoiser,
    attach_interval,
    flow_map_sigmas,
    interval,
    without_interval,
)

import families
from gmm import GMMBackbone, mixture, ode_endpoints, two_class_gmm
from tiny import run_cli

FLOW = Schedule(kind="flow", num_train_timesteps=1000, shift=3.0)
MU, STD = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0.3
TOLERANCE = 1e-4


class Holder(nn.Module):
    h = None


class ExactGaussianMap(nn.Module):
    """The exact average velocity of the flow teacher of N(MU, STD^2 I): the ODE keeps the
    standardised coordinate, z_r = (1 - r) MU + g_r / g_t (z_t - (1 - t) MU), g_s^2 =
    (1 - s)^2 STD^2 + s^2, so u = (z_t - z_r) / (t - r) (and v, its limit r -> t)."""

    def __init__(self):
        super().__init__()
        setattr(self, ATTR, Holder())

    def forward(self, z, timestep, class_labels=None):
        T = 1000
        t = (timestep / T).reshape(-1, 1)
        h = getattr(self, ATTR).h
        r = t - (torch.zeros_like(t) if h is None else (h / T).reshape(-1, 1))
        g = lambda s: ((1 - s) ** 2 * STD**2 + s**2).sqrt()  # noqa: E731
        m = z - (1 - t) * MU
        dg = (t * (1 + STD**2) - STD**2) / g(t)  # dg/dt
        v = -MU + dg / g(t) * m
        z_r = (1 - r) * MU + g(r) / g(t) * m
        u = torch.where((t - r).abs() > 1e-12, (z - z_r) / (t - r).clamp(min=1e-12), v)
        return SimpleNamespace(sample=u)


def _gaussian_teacher():
    return Denoiser(GMMBackbone(MU[None], [STD], [0], FLOW, "flow"), FLOW, "flow")


class _Rng:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, shape, dtype=torch.float32):
        return torch.randn(tuple(shape), generator=self.g, dtype=dtype)

    def rand(self, n, dtype=torch.float32):
        return torch.rand(n, generator=self.g, dtype=dtype)


def test_the_exact_flow_map_satisfies_the_meanflow_identity_and_the_teacher_does_not():
    """With the exact Gaussian flow map as student, the MeanFlow target (v - (t - r) du/dt by
    the JVP) is u itself: the loss is 0 to float64 round-off. The teacher taken as its own flow
    map (u = v, the 1-step Euler map) is far from it, and so is its loss."""
    teacher = _gaussian_teacher()
    exact = FlowMapDenoiser(ExactGaussianMap(), FLOW, "flow")
    g = torch.Generator().manual_seed(0)
    x0 = MU + STD * torch.randn(256, 3, generator=g, dtype=torch.float64)
    config = MeanFlowConfig(flow_map_ratio=1.0, adaptive_p=0.0, objective="jvp")
    _, mse = meanflow_loss(exact, teacher, x0, None, config, 3.0, _Rng(1))
    assert mse < 1e-20, mse
    # the exact u at r -> t is the teacher's velocity
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.full((8,), 0.7, dtype=torch.float64)
    x0_hat = teacher.predict(z, t * 1000)[0]
    u_tt = average_velocity(exact, z, t, t, None)
    torch.testing.assert_close(u_tt, (z - x0_hat) / 0.7)  # u = v = (z - x0) / t
    # the r-blind teacher as a flow map misses the exact maps, and its loss shows it
    naive = FlowMapDenoiser(_NaiveMap(teacher.backbone), FLOW, "flow")
    _, naive_mse = meanflow_loss(naive, teacher, x0, None, config, 3.0, _Rng(1))
    assert naive_mse > 1e-3, (
        naive_mse
    )  # measured 3.9e-3: a single Gaussian's flow is nearly straight


def test_the_split_target_converges_to_the_exact_flow_map_as_its_teacher_step_shrinks():
    """SplitMeanFlow's identity holds exactly for the exact map; its target replaces the first
    sub-interval's u by one teacher Euler step, an O(step^2) error on that sub-interval: the
    exact map's loss falls by at least 20x from step 1/28 to 1/100 (measured 5.1e-5 to 1.3e-6,
    38x; step^2 alone is 12.8x), to below 1e-5, while the r-blind teacher's stays 10x above it
    (measured 3.2e-5)."""
    teacher = _gaussian_teacher()
    exact = FlowMapDenoiser(ExactGaussianMap(), FLOW, "flow")
    naive = FlowMapDenoiser(_NaiveMap(teacher.backbone), FLOW, "flow")
    g = torch.Generator().manual_seed(0)
    x0 = MU + STD * torch.randn(256, 3, generator=g, dtype=torch.float64)

    def mse(model, step):
        config = MeanFlowConfig(
            flow_map_ratio=1.0, adaptive_p=0.0, objective="split", split_step=step
        )
        return meanflow_loss(model, teacher, x0, None, config, 3.0, _Rng(1))[1].item()

    coarse, fine = mse(exact, 1 / 28), mse(exact, 1 / 100)
    assert fine < coarse / 20 and fine < 1e-5, (coarse, fine)
    assert mse(naive, 1 / 100) > 10 * fine


class _NaiveMap(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base
        setattr(self, ATTR, Holder())

    def forward(self, z, t, class_labels=None):
        return self.base(z, t, class_labels)


class MapResidual(nn.Module):
    """The mixture's exact flow teacher plus a learnable correction fed by a diffusers timestep
    embedding (``time_proj`` + ``timestep_embedder``, which ``attach_interval`` extends with the
    interval), zero at initialisation."""

    def __init__(self, base, hidden=256):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.base = base
        self.time_proj = Timesteps(32, True, 0, scale=0.01)  # smooth in t: JVP-friendly
        self.timestep_embedder = TimestepEmbedding(32, 64).double()
        self.net = nn.Sequential(
            nn.Linear(4 * 3 + 64 + 3, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 4),
        ).double()  # fmt: skip
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, device=x.device).expand(len(x))
        s = (t / 1000).double()[:, None]
        emb = self.timestep_embedder(self.time_proj(t).double())
        onehot = nn.functional.one_hot(class_labels, 3).double()
        feats = torch.cat([x, x * (1 - s), x * s, emb, onehot], 1)
        return SimpleNamespace(sample=self.base(x, t, class_labels).sample + self.net(feats))


def _exact_u(teacher, z, t, r, labels, steps=64):
    """u = (z_t - z_r) / (t - r) with z_r from RK4 on the teacher's ODE over [r, t]."""

    def v(x, s):
        x0, e = teacher.predict(x, s * 1000, labels)
        return e - x0

    x = z
    hs = (r - t) / steps
    for i in range(steps):
        s = t + i * hs
        h = hs[:, None]
        k1 = v(x, s)
        k2 = v(x + h / 2 * k1, s + hs / 2)
        k3 = v(x + h / 2 * k2, s + hs / 2)
        k4 = v(x + h * k3, s + hs)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return (z - x) / (t - r)[:, None]


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective, u_ratio, bounds",
    [("jvp", 0.45, [0.3, 0.07, 0.028]), ("split", 0.3, [0.1, 0.05, 0.028])],
)
def test_meanflow_student_matches_the_exact_average_velocity_and_ode_endpoints(
    objective, u_ratio, bounds
):
    """MeanFlow distillation of the two-class mixture's exact flow teacher (2500 iterations,
    every pair with r < t, a wide time proposal: p_std 2).

    u at 512 (t, r) pairs (t > r drawn uniformly, z_t from the data): mean squared error to the
    exact u (RK4 over [r, t]) at most 0.45 of the teacher's own velocity's (u = v, which the
    student starts as; measured 0.28-0.35 across runs of 1500-3000 iterations). From noise, one
    checkpoint, mean squared error to the teacher's exact ODE endpoints: 1 step below 0.3, 2 steps
    below 0.07 and 4 steps below 0.028, where the initial student (the teacher's Euler sampler)
    reads 0.80, 0.127 and 0.028 (measured after training: 0.11-0.15, 0.026-0.032, 0.013-0.017).
    The split objective (teacher step 1/28), same run: u within 0.3 of the teacher's error
    (measured 0.19) and endpoints below 0.1, 0.05 and 0.028 (measured 0.043, 0.026, 0.021)."""
    from distill.meanflow import distill, sample_flow_map

    gmm = two_class_gmm(FLOW, "flow")
    teacher = Denoiser(gmm, FLOW, "flow")
    data = mixture(gmm, 8192, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    init = MapResidual(gmm)
    g = torch.Generator().manual_seed(3)
    n = 512
    labels = torch.arange(n) % 2
    x, _ = mixture(gmm, n, g)
    a, b = (torch.rand(n, generator=g, dtype=torch.float64) for _ in (0, 1))
    t, r = torch.maximum(a, b).clamp(min=0.02), torch.minimum(a, b)
    e = torch.randn(n, 4, generator=g, dtype=torch.float64)
    z = (1 - t)[:, None] * x + t[:, None] * e
    exact = _exact_u(teacher, z, t, r, labels)
    v = _exact_u(teacher, z, t, t - 1e-9, labels, steps=1)  # the teacher's velocity
    err0 = (v - exact).pow(2).mean().item()
    x_T = torch.randn(n, 4, generator=g, dtype=torch.float64)
    ends = ode_endpoints(teacher, x_T, labels)

    def errors(model):
        return [
            (sample_flow_map(model, x_T, k, labels) - ends).pow(2).mean().item() for k in (1, 2, 4)
        ]

    before = errors(FlowMapDenoiser(attach_interval(copy.deepcopy(init)), FLOW, "flow"))
    assert all(b0 >= bound for b0, bound in zip(before, bounds, strict=True)), before
    config = MeanFlowConfig(
        iterations=2500, batch_size=256, learning_rate=1e-3, ema_decay=0.0, flow_map_ratio=1.0,
        p_std=2.0, shift=1.0, checkpoint_every=0, objective=objective,
    )  # fmt: skip
    student, log = distill(teacher, data, config, progress=lambda m: None, student_init=init)
    with torch.no_grad():
        err = (average_velocity(student, z, t, r, labels) - exact).pow(2).mean().item()
    assert err < u_ratio * err0, (err0, err)
    after = errors(student)
    assert all(a < bound for a, bound in zip(after, bounds, strict=True)), (before, after)


def test_the_interval_embedding_starts_at_zero_and_stays_out_of_the_stock_weights():
    from diffusers import SD3Transformer2DModel

    pipe = families.build_pipeline("sd3", 0)
    backbone = pipe.transformer.eval()
    x = torch.randn(1, *families.latent_shape("sd3")[1:])
    kw = dict(
        encoder_hidden_states=torch.randn(1, 5, backbone.config.joint_attention_dim),
        pooled_projections=torch.randn(1, backbone.config.pooled_projection_dim),
    )
    ref = backbone(x, timestep=torch.tensor([700.0]), **kw).sample
    stock_keys = set(backbone.state_dict())
    attach_interval(backbone)
    with interval(backbone, torch.tensor([500.0])):
        assert torch.equal(backbone(x, timestep=torch.tensor([700.0]), **kw).sample, ref)
    nn.init.normal_(getattr(backbone, ATTR).embed.linear_2.weight)
    with interval(backbone, torch.tensor([500.0])):
        moved = backbone(x, timestep=torch.tensor([700.0]), **kw).sample
    assert (moved - ref).abs().max() > 1e-3
    ema = copy.deepcopy(backbone)  # the EMA copy's hook is its own embedding
    nn.init.zeros_(getattr(ema, ATTR).embed.linear_2.weight)
    with interval(ema, torch.tensor([500.0])):
        assert not torch.equal(ema(x, timestep=torch.tensor([700.0]), **kw).sample, moved)
    with without_interval(backbone):
        assert set(backbone.state_dict()) == stock_keys
    assert isinstance(backbone, SD3Transformer2DModel)


def test_flow_map_plan_steps_carry_r():
    from accel.core.plan import SamplerPlan, Step

    sig = flow_map_sigmas(4, 3.0)
    from diffusers import FlowMapEulerDiscreteScheduler

    sched = FlowMapEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(4)
    assert sig == pytest.approx(sched.sigmas.tolist(), abs=1e-12)
    with pytest.raises(ValueError, match="r_timestep"):
        SamplerPlan(steps=[Step(1000.0, 0.5, 0.5)], sample_shape=[4, 4, 4], sampler="flow_map")
    with pytest.raises(ValueError, match="r_timestep"):
        SamplerPlan(steps=[Step(1000.0, 0.5, 0.5, r_timestep=500.0)], sample_shape=[4, 4, 4])


def _student(family, tmp_path, monkeypatch, capsys):
    """A few-iteration MeanFlow student of the tiny pipeline, its interval embedding then set to
    random weights (a 2-iteration one barely moves from zero: r would hardly matter)."""
    from safetensors.torch import load_file, save_file

    teacher = families.write_pipeline(family, tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    student = tmp_path / "student"
    code, _, err = run_cli(
        monkeypatch, capsys, "distill", "meanflow", teacher, "--iterations", 2, "--batch-size", 2,
        "--guidance-scale", 2.0, "--dataset", f"prompts:{tmp_path / 'prompts.txt'}",
        "--out", student, "--store", tmp_path / "store",
    )  # fmt: skip
    assert code == 0, err
    # a user's copy of the pipeline (no store manifest), its interval embedding replaced
    model = tmp_path / "model"
    shutil.copytree(student, model, ignore=shutil.ignore_patterns("manifest.json"))
    file = model / "transformer" / INTERVAL_FILE
    g = torch.Generator().manual_seed(0)
    state = {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in load_file(str(file)).items()}
    file.unlink()
    save_file(state, str(file))
    return model


def _sample(monkeypatch, capsys, model, out, steps=None):
    """``accel sample`` of a pipeline (at 32 px, ``steps``) or of an engine or bundle (its own)."""
    extra = [] if steps is None else ["--steps", steps, "--height", 32, "--width", 32]
    code, _, err = run_cli(monkeypatch, capsys, "sample", model, "--prompt", "a red circle",
                           "--seed", 0, "--out", out, *extra)  # fmt: skip
    assert code == 0, err
    return np.load(out)


@pytest.mark.parametrize("family", ["sd3", "sana"])
def test_meanflow_students_run_in_the_stock_pipeline_with_flow_map_euler(
    family, tmp_path, monkeypatch, capsys
):
    """The student is the stock pipeline with ``FlowMapEulerDiscreteScheduler``; with its r input
    (``load_flow_map_pipeline``) it draws what ``accel sample`` draws at 1, 2 and 4 steps from
    one checkpoint, and the r input matters (without it the draw differs)."""
    import diffusers

    from accel.core.model_info import ModelInfo
    from distill.students import load_flow_map_pipeline

    student = _student(family, tmp_path, monkeypatch, capsys)
    info = ModelInfo.read(student)
    assert info.method == "meanflow" and info.distilled_guidance_scale == 2.0
    index = json.loads((student / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMapEulerDiscreteScheduler"]
    stock = {"sd3": "StableDiffusion3Pipeline", "sana": "SanaPipeline"}[family]
    assert index["_class_name"] == stock
    pipe = load_flow_map_pipeline(student, **families.load_kwargs(family))
    assert type(pipe) is getattr(diffusers, stock)
    extra = families.stock_kwargs(family)
    extra.pop("max_sequence_length", None)
    extra.pop("complex_human_instruction", None)
    for steps in (1, 2, 4):
        ours = _sample(monkeypatch, capsys, student, tmp_path / f"s{steps}.npz", steps)
        images = pipe(
            ["a red circle"], latents=torch.from_numpy(ours["latents"]),
            num_inference_steps=steps, guidance_scale=1.0, output_type="np", **extra,
        ).images  # fmt: skip
        assert np.abs(images - ours["images"].transpose(0, 2, 3, 1)).max() <= TOLERANCE, steps
    plain = families.load_pipeline(family, student)  # no r: u(z, t, t), a different draw
    images = plain(
        ["a red circle"], latents=torch.from_numpy(ours["latents"]), num_inference_steps=4,
        guidance_scale=1.0, output_type="np", **extra,
    ).images  # fmt: skip
    assert np.abs(images - ours["images"].transpose(0, 2, 3, 1)).max() > 1e-3


def test_meanflow_flux_student_exports_with_r_and_its_bundle_draws_the_same(
    tmp_path, monkeypatch, capsys
):
    """A Flux (FLUX.1-dev form) flow-map student: the exported denoiser takes ``r_timestep``,
    the plan gives each step its r, and the engine and the bundle draw what torch draws."""
    import onnx

    from accel.core.plan import SamplerPlan

    student = _student("flux", tmp_path, monkeypatch, capsys)
    onnx_dir, engine, bundle = (tmp_path / k for k in ("onnx", "engine", "bundle"))
    for args in (
        ("export", "onnx", student, "--num-inference-steps", 2, "--resolution", "[32, 32]",
         "--out", onnx_dir),
        ("compile", onnx_dir, "--gate", "{ samples = 4, seeds = [0] }", "--out", engine),
        ("bundle", engine, "--out", bundle),
    ):  # fmt: skip
        code, _, err = run_cli(monkeypatch, capsys, *args, "--store", tmp_path / "store")
        assert code == 0, err
    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    assert "r_timestep" in [i.name for i in graph.graph.input]
    plan = SamplerPlan.load(bundle / "sampler_plan.json")
    assert plan.sampler == "flow_map" and plan.steps[-1].r_timestep == 0.0
    assert [s.r_timestep for s in plan.steps[:-1]] == [s.timestep for s in plan.steps[1:]]
    ref = _sample(monkeypatch, capsys, student, tmp_path / "t.npz", 2)
    for model in (engine, bundle):
        got = _sample(monkeypatch, capsys, model, tmp_path / "b.npz")
        assert np.abs(got["images"] - ref["images"]).max() <= TOLERANCE
