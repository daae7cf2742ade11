"""Flow maps by MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"),
distilled from a flow teacher: one student that samples at any step count.

The average velocity of the teacher's probability-flow ODE over [r, t] (flow time: z_t =
(1 - t) x0 + t e, velocity v = e - x0, z_r = z_t - (t - r) u) is

    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds,

and MeanFlow's identity (their eq. 6), from differentiating (t - r) u = int_r^t v ds in t, is

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),
    d/dt u = v(z_t, t) . grad_z u + d_t u,

the total derivative along the ODE: one forward-mode JVP of u_theta with tangents (v, 0, 1) in
(z, r, t) (``torch.func.jvp``). The objective (their eq. 9 and Algorithm 1) regresses u_theta on
the identity's right-hand side with a stop-gradient,

    L = E || u_theta(z_t, r, t) - sg(v - (t - r) (v . grad_z u_theta + d_t u_theta)) ||^2,

weighted adaptively per example by sg(1 / (||delta||^2 / D + c)^p) (their sec. 4.3; p = 1,
c = 1e-3). (t, r): two logit-normal draws (mean -0.4), t the larger, and r = t for a share
1 - ``flow_map_ratio`` of the batch, then the teacher's time shift applied to both (a monotone
map: r <= t stays).

The "split" objective (``objective = "split"``) regresses u_theta on the interval-splitting
identity of SplitMeanFlow (Guo et al. 2025, "SplitMeanFlow: Interval Splitting Consistency in
Few-Step Generative Modeling"), the algebraic form of the same property of which MeanFlow's
identity is the differential limit:

    (t - r) u(z_t, r, t) = (t - s) u(z_t, s, t) + (s - r) u(z_s, r, s),  z_s = z_t - (t - s) u(z_t, s, t).

Here the short first sub-interval [s, t] (s = max(r, t - ``split_step``), one step of the
teacher's sampler by default) is the teacher's Euler step (u(z_t, s, t) ~ v, an O(step^2) error)
and the rest is the student under stop-gradient: a flow-map form of discrete consistency
distillation, no JVP. SplitMeanFlow draws s uniformly and takes both sub-intervals from the
student; with a teacher at hand, a teacher step anchors every target to the teacher's ODE, as
consistency distillation's solver step does. Measured on the Gaussian mixture (same run as the
JVP form's test): 1-step endpoint error 0.043 against 0.11-0.15, in a third of the time.

Distillation (the paper trains from data; the issue asks for a distilled student): v is the
teacher's guided velocity at z_t, not the conditional e - x0 of one sample, so the r = t part is
plain velocity distillation and the target has no sample noise; z_t is built from data (or the
teacher's samples) as in the paper.

Students. The flow-map student is the teacher's transformer with one module added: an interval
embedding of h = t - r (the paper's (t, t - r) conditioning, their Table 1c), a copy of the
transformer's own timestep embedder (``timestep_embedder``, fed by its ``time_proj``) whose output
is added to the timestep embedding, last layer zero-initialised so that the student starts as
the teacher (u = v: the 1-step Euler map). Its weights are ``flow_map_interval.safetensors`` in the
denoiser's folder; the transformer's own weights stay stock. It samples with diffusers'
``FlowMapEulerDiscreteScheduler`` (z_r = z_t - (sigma_t - sigma_r) u) at the sigmas of any step
count; ``load_flow_map_pipeline`` opens it as the family's stock pipeline with that scheduler and
gives the transformer its r input (a hook that reads r from the scheduler's schedule), since SD3,
Flux and Sana transformers take no r of their own. The exported graph takes ``r_timestep``.

Deviations: the time proposal's std is 2 (theirs 1.0) and r != t for 75% of the batch (theirs
25%): their values train from scratch, where r = t is the flow-matching half of the work, while a
distilled student starts at the teacher (r = t done) and its 1-step jump (t = 1, r = 0) is a pair
that std 1 almost never draws. On the Gaussian mixture (``tests/test_meanflow.py``) 1500
iterations reach a 1-step endpoint error of 0.37 with theirs, 0.15-0.17 with these. The paper's
(t, r) embeddings are two positional embeddings of a model trained from scratch; here the
interval embedding is added to a pretrained transformer's. No CFG in the
target beyond the teacher's guided velocity (the paper's CFG variant mixes conditional and
unconditional u_theta).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from accel.core.errors import StageError
from accel.core.stage import StageContext, say
from distill.checkpoint import guidance_info, load_teacher
from distill.configs import MeanFlowConfig
from distill.data import take, to_device
from distill.denoiser import Denoiser, takes_w, w_conditioning
from distill.schedule import _bcast
from distill.students import (
    FLOW_MAP,
    FlowMapDenoiser,
    attach_interval,
    flow_map_sigmas,
    interval,
    save_interval,
    save_student,
    shifted,
    without_interval,
)
from distill.trainer import Trainer, mean_tail

# ---------------------------------------------------------------- the interval input


def average_velocity(student: Denoiser, x, t_sigma, r_sigma, labels) -> torch.Tensor:
    """u_theta(x, r, t) at flow sigmas (per example), differentiable in all three."""
    T = student.schedule.num_train_timesteps
    with interval(student.backbone, (t_sigma - r_sigma) * T):
        x0, e = student.predict(x, t_sigma * T, labels)
    return e - x0


def teacher_velocity(teacher: Denoiser, x, t_sigma, labels) -> torch.Tensor:
    x0, e = teacher.predict(x, t_sigma * teacher.schedule.num_train_timesteps, labels)
    return e - x0


def time_pairs(n: int, config: MeanFlowConfig, shift: float, rng) -> tuple[torch.Tensor, ...]:
    """(t, r) per example: MeanFlow's two logit-normal draws, t the larger, r = t for a share
    1 - flow_map_ratio, then ``shift`` on both."""
    a, b = (
        torch.sigmoid(config.p_mean + config.p_std * rng.randn((n,), torch.float64)) for _ in (0, 1)
    )
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    same = rng.rand(n, torch.float64) >= config.flow_map_ratio
    r = torch.where(same, t, r)
    return shifted(t, shift), shifted(r, shift)


def meanflow_loss(
    student: Denoiser,
    teacher: Denoiser,
    x0: torch.Tensor,
    labels,
    config: MeanFlowConfig,
    shift: float,
    rng,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the distilled MeanFlow objective (module docstring) at data ``x0``; returns
    the weighted loss and the unweighted mean squared error."""
    t, r = (v.to(x0.device) for v in time_pairs(len(x0), config, shift, rng))
    e = rng.randn(x0.shape, x0.dtype)
    z = _bcast(1 - t, x0).to(x0.dtype) * x0 + _bcast(t, x0).to(x0.dtype) * e
    with torch.no_grad():
        v = teacher_velocity(teacher, z, t, labels)
    if config.objective == "split":
        target = split_target(student, z, t, r, v, labels, config.split_step)
    else:
        target = jvp_target(student, z, t, r, v, labels)
    u = average_velocity(student, z, t, r, labels)
    per = (u - target).pow(2).flatten(1).mean(1)
    if config.adaptive_p == 0:
        return per.mean(), per.detach().mean()
    w = (per.detach() + config.adaptive_c).pow(-config.adaptive_p)
    return (w * per).mean(), per.detach().mean()


@torch.no_grad()
def split_target(student, z, t, r, v, labels, step: float) -> torch.Tensor:
    """SplitMeanFlow's interval-splitting identity (Guo et al. 2025), (t - r) u(z_t, r, t) =
    (t - s) u(z_t, s, t) + (s - r) u(z_s, r, s), with the short first sub-interval [s, t]
    (s = max(r, t - step)) taken by the teacher's Euler step (u(z_t, s, t) ~ v, z_s = z_t -
    (t - s) v) and the rest by the student, stop-gradient. Pairs shorter than ``step`` get v."""
    s = torch.maximum(r, t - step)
    z_s = z - _bcast(t - s, z).to(z.dtype) * v
    u_s = average_velocity(student, z_s, s, r, labels)
    gap = t - r
    w = torch.where(gap > 0, (s - r) / gap.clamp(min=1e-12), torch.zeros_like(gap))
    w = _bcast(w, z).to(z.dtype)
    return w * u_s + (1 - w) * v


def jvp_target(student, z, t, r, v, labels) -> torch.Tensor:
    """MeanFlow's target v - (t - r) du/dt, du/dt by one JVP with tangents (v, 0, 1)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad():
        with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD through attention
            _, dudt = torch.func.jvp(
                lambda zz, rr, tt: average_velocity(student, zz, tt, rr, labels),
                (z, r, t),
                (v, torch.zeros_like(r), torch.ones_like(t)),
            )
        return v - _bcast(t - r, v).to(v.dtype) * dudt


def teacher_shift(teacher: Denoiser) -> float:
    """The teacher's static shift, or e^mu of its dynamic shift at its default resolution (the
    exponential shift with sigma 1 is the static one with k = e^mu)."""
    import math

    adapter = teacher.adapter
    if adapter.pixel:  # a bare backbone's schedule (the Gaussian-mixture flow teachers)
        return float(teacher.schedule.shift)
    shift = adapter.flow_shift(1, *adapter.default_resolution()) or {"shift": 1.0}
    return float(shift["shift"]) if "shift" in shift else math.exp(shift["mu"])


def distill(
    teacher: Denoiser,
    data: tuple[torch.Tensor, object],
    config: MeanFlowConfig,
    work: Path | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = say,
    student_init: nn.Module | None = None,
) -> tuple[FlowMapDenoiser, list[dict[str, float]]]:
    """Train a flow-map student initialised from the flow teacher's backbone (or
    ``student_init``) plus a zero interval embedding (so it starts as the teacher's 1-step Euler
    map)."""
    if teacher.schedule.kind != "flow":
        raise StageError(
            "meanflow", "MeanFlow distils flow-matching teachers (SD3, Flux, Sana); this teacher "
            "is a discrete VP model",
        )  # fmt: skip
    trainer = Trainer("meanflow", config, config.iterations, work, resume, progress=progress)
    shift = config.shift or teacher_shift(teacher)
    adapter = teacher.adapter
    init = teacher.backbone if student_init is None else student_init
    backbone = attach_interval(copy.deepcopy(init)).requires_grad_(True).train()
    ema = copy.deepcopy(backbone).requires_grad_(False) if config.ema_decay > 0 else None
    opt = torch.optim.Adam(backbone.parameters(), lr=config.learning_rate)
    backbone, opt = trainer.prepare(backbone, opt)
    if ema is not None:
        trainer.ema(ema, backbone, config.ema_decay)
    trainer.place_teacher(teacher)
    student = teacher.student_of(backbone, FlowMapDenoiser)
    x_data, y_data = to_device(data, trainer.device)
    with_w = w_conditioning(adapter, backbone, config.guidance_scale, trainer.device)

    def step() -> dict[str, torch.Tensor]:
        idx = trainer.randint(len(x_data), config.batch_size)
        labels = with_w(take(y_data, idx), len(idx))
        loss, mse = meanflow_loss(student, teacher, x_data[idx], labels, config, shift, trainer)
        trainer.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach(), "mse": mse}

    log = trainer.run(step)
    final = trainer.unwrap(ema if ema is not None else backbone).eval().requires_grad_(False)
    out = teacher.student_of(final, FlowMapDenoiser)
    out.flow_map_shift = shift  # type: ignore[attr-defined]
    return out, log  # type: ignore[return-value]


@torch.no_grad()
def sample_flow_map(
    student: FlowMapDenoiser, x: torch.Tensor, steps: int, labels=None
) -> torch.Tensor:
    """``steps`` flow-map jumps z_r = z_t - (s_t - s_r) u(z_t, r, t) over ``flow_map_sigmas``."""
    sig = flow_map_sigmas(steps, float(getattr(student, "flow_map_shift", 1.0)))
    for s, s_next in zip(sig[:-1], sig[1:], strict=True):
        t = torch.full((len(x),), s, dtype=torch.float64)
        u = average_velocity(student, x, t, torch.full_like(t, s_next), labels)
        x = x - (s - s_next) * u
    return x


def run(ctx: StageContext) -> None:
    config: MeanFlowConfig = ctx.config  # type: ignore[assignment]
    from distill.data import stage_data

    teacher, info = load_teacher(ctx.input.path, "meanflow", config.guidance_scale, flow=True)
    data = stage_data(ctx, teacher, config.dataset, config.seed)
    student, log = distill(teacher, data, config, ctx.work, ctx.resume, ctx.progress)
    backbone = student.backbone
    with without_interval(backbone):  # stock weights stay stock; the interval beside them
        save_student(
            ctx,
            backbone,
            FLOW_MAP.scheduler_config({}, shift=student.flow_map_shift),  # type: ignore[attr-defined]
            info.student(
                method="meanflow",
                num_inference_steps=config.num_inference_steps,
                **guidance_info(info, config.guidance_scale, takes_w(backbone)),
            ),
            teacher,
            log,
            {"final_loss": mean_tail(log)},
        )
    folder = teacher.adapter.denoiser_folder
    save_interval(backbone, ctx.out / folder)
