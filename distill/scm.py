"""Continuous-time consistency distillation, sCM (Lu & Song 2024, "Simplifying, Stabilizing and
Scaling Continuous-time Consistency Models", ICLR 2025: sCD, their Algorithm 1), on flow teachers.

TrigFlow. A state at TrigFlow time t in [0, pi/2] is x_t = cos(t) x0 + sin(t) z, in model units
(the paper's x / sigma_d: the latents a flow model reads, noise of unit variance), with
probability-flow velocity dx_t/dt = F(x_t, t) = E[cos(t) z - sin(t) x0 | x_t] and consistency
function f(x_t, t) = cos(t) x_t - sin(t) F_theta(x_t, t), which meets f(x, 0) = x by its form.

From a flow teacher (rectified flow, z_s = (1 - s) x0 + s z, velocity v = z - x0), as SANA-Sprint
converts it (diffusers' ``SanaSprintPipeline`` applies the inverse map at sampling time): x_t is
z_s scaled by (cos t + sin t) at s = sin t / (sin t + cos t), so with the flow model's
(x0_hat, z_hat) = (z_s - s v, z_s + (1 - s) v) at z_s = x_t / (cos t + sin t),

    F = cos(t) z_hat - sin(t) x0_hat,        f(x_t, t) = x0_hat.

The student keeps the flow parameterisation (a stock flow transformer); its consistency function is
its own flow x0 = z_s - s v, the ``FlowConsistencyDenoiser`` of the flow form of LCM, so it samples
as ``FlowMatchLCMScheduler`` does: x0, then re-noise at the next sigma, at the TrigFlow grid of
``SCMScheduler`` (pi/2, 1.3, 0 at two steps; uniform in t otherwise) mapped to flow sigmas.
``SCMScheduler.step`` on the TrigFlow state computes the same numbers (its x0 is
cos(s) x - sin(s) F, which the map above turns into z_s - s v).

Objective (sCD, their eq. 8 and Algorithm 1). theta- = stopgrad(theta); the teacher's guided
velocity dx_t/dt = F_teacher(x_t, t); the tangent of the consistency function along the teacher's
ODE, weighted by cos(t),

    g = -cos^2(t) (F_theta-(x_t, t) - dx_t/dt) - r cos(t) sin(t) (x_t + dF_theta-/dt),

with cos(t) sin(t) dF_theta-/dt from one forward-mode JVP (``torch.func.jvp``) with tangents
(cos(t) sin(t) dx_t/dt, cos(t) sin(t)) (their stable form), r warmed up linearly from 0 to 1 over
``tangent_warmup`` iterations (tangent warm-up) and g normalised to g / (||g|| + c), c = 0.1
(tangent normalisation); then

    L = E[ exp(w(t)) / D ||F_theta(x_t, t) - F_theta-(x_t, t) - g||^2 - w(t) ],

w a learned adaptive weight (a small MLP on Fourier features of t, trained jointly), D the
dimension, and t = arctan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2) (their proposal;
P_mean = -1.0, P_std = 1.4 are their CIFAR-10 values, Appendix G). The gradient of the squared
term is the continuous-time consistency gradient -cos(t) dF/dtheta . df_theta-/dt.

rCM (Zheng et al. 2025, "Large Scale Diffusion Distillation via Score-Regularized Continuous-Time
Consistency") is this stage with ``dmd_weight`` lambda > 0: the student's loss becomes
L + lambda L_DMD, DMD's reverse-divergence term (``distill.dmd``: a fake score mu_fake, a copy of
the teacher trained to denoise the student's samples, one update per student update, and
L_DMD = 1/2 ||x - sg(x - (mu_fake - mu_real) / mean|x - mu_real|)||^2 at x noised to a flow time
s ~ U[0.02, 0.98]), on samples the student draws as it samples: k ~ U{0..N-1} of its N =
``num_inference_steps`` TrigFlow-grid steps from noise without gradients (backward simulation),
then one step with them. rCM's lambda is small (its sCM term carries the trajectory; the DMD term
sharpens): ``dmd_weight`` 0.01 as a starting point.

Deviations: sigma_d only shapes the time proposal (model units already put the data near unit
scale: ``sigma_data`` is the data's standard deviation in those units, 1 by default); the JVP runs
with the math SDPA kernel (the fused CPU attention kernels have no forward-mode derivative); the
student is sampled from its EMA (``ema_decay``), as the paper evaluates EMA weights.
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
from distill.configs import SCMConfig
from distill.data import take, to_device
from distill.denoiser import Denoiser, FlowConsistencyDenoiser, takes_w, w_conditioning
from distill.gan import dmd_gradient
from distill.schedule import _bcast
from distill.students import TRIGFLOW, flow_sigma, save_student, scm_flow_grid
from distill.trainer import Trainer, mean_tail

TANGENT_NORM = 0.1  # c of the tangent normalisation g / (||g|| + c)


def trig_velocity(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, labels) -> torch.Tensor:
    """F(x_t, t) of a flow-parameterised ``denoiser`` at TrigFlow state ``x`` and time ``t``
    (per example): cos(t) z_hat - sin(t) x0_hat at z_s = x / (cos t + sin t), s = flow_sigma(t).
    Differentiable in x and t (forward and reverse mode)."""
    c, n = _bcast(t.cos(), x), _bcast(t.sin(), x)
    s = flow_sigma(t)
    x0, z = denoiser.predict(x / (c + n), s * denoiser.schedule.num_train_timesteps, labels)
    return c * z - n * x0


class TimeWeight(nn.Module):
    """sCM's adaptive weight w(t): a linear map of Fourier features of t, zero at the start."""

    def __init__(self, features: int = 16) -> None:
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(features // 2).float(), persistent=False)
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angle = t.float()[:, None] * self.freqs
        return self.linear(torch.cat([angle.sin(), angle.cos()], 1)).squeeze(1)


def scm_tangent(
    student: Denoiser, teacher: Denoiser, x_t: torch.Tensor, t: torch.Tensor, labels, r: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_theta-(x_t, t), g): the student's TrigFlow velocity and the tangent
    g = cos(t) df_theta-/dt along the teacher's ODE (second term scaled by r), unnormalised."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cs = t.cos() * t.sin()
    dxdt = trig_velocity(teacher, x_t, t, labels)
    with sdpa_kernel(SDPBackend.MATH):  # forward-mode AD through attention
        F_minus, dF = torch.func.jvp(
            lambda x, tt: trig_velocity(student, x, tt, labels),
            (x_t, t),
            (_bcast(cs, x_t) * dxdt, cs),
        )
    g = -_bcast(t.cos() ** 2, x_t) * (F_minus - dxdt) - r * (_bcast(cs, x_t) * x_t + dF)
    return F_minus, g


def scm_loss(
    student: Denoiser,
    teacher: Denoiser,
    weight: nn.Module | None,
    x0: torch.Tensor,
    labels,
    config: SCMConfig,
    r: float,
    rng,
) -> torch.Tensor:
    """One batch of the sCD objective (module docstring) at data ``x0``."""
    n = len(x0)
    tau = config.p_mean + config.p_std * rng.randn((n,), torch.float64).to(x0.device)
    t = torch.atan(tau.exp() / config.sigma_data)
    z = rng.randn(x0.shape, x0.dtype)
    x_t = _bcast(t.cos(), x0) * x0 + _bcast(t.sin(), x0) * z
    with torch.no_grad():
        F_minus, g = scm_tangent(student, teacher, x_t, t, labels, r)
        g = g / _bcast(g.flatten(1).norm(dim=1) + TANGENT_NORM, g)
    F = trig_velocity(student, x_t, t, labels)
    per = (F - F_minus - g).pow(2).flatten(1).mean(1)  # ||.||^2 / D
    if weight is None:
        return per.mean()
    w = weight(t).to(per.dtype)
    return (w.exp() * per - w).mean()


def distill(
    teacher: Denoiser,
    data: tuple[torch.Tensor, object],
    config: SCMConfig,
    work: Path | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = say,
) -> tuple[FlowConsistencyDenoiser, list[dict[str, float]]]:
    """Train an sCM student initialised from the flow teacher's backbone; the teacher's guidance
    is distilled in (or, for a backbone with a w input, given to it as w)."""
    if teacher.schedule.kind != "flow":
        raise StageError(
            "scm", "sCM distils flow-matching teachers (SD3, Flux, Sana); use consistency for "
            "this VP teacher",
        )  # fmt: skip
    trainer = Trainer("scm", config, config.iterations, work, resume, progress=progress)
    adapter = teacher.adapter
    backbone = copy.deepcopy(teacher.backbone).requires_grad_(True).train()
    weight = TimeWeight() if config.adaptive_weighting else None
    ema = copy.deepcopy(backbone).requires_grad_(False) if config.ema_decay > 0 else None
    params = [*backbone.parameters(), *(weight.parameters() if weight else [])]
    opt = torch.optim.Adam(params, lr=config.learning_rate)
    models: list = [backbone, weight, opt] if weight is not None else [backbone, opt]
    rcm = config.dmd_weight > 0
    if rcm:  # the fake score: the teacher's backbone, trained on the student's samples
        f_net = copy.deepcopy(teacher.backbone).requires_grad_(True).train()
        lr_c = config.critic_learning_rate or config.learning_rate
        models += [f_net, torch.optim.Adam(f_net.parameters(), lr=lr_c)]
    models = list(trainer.prepare(*models))
    if rcm:
        *models, f_net, opt_c = models
        fake = teacher.student_of(f_net)
        fake.guidance_scale = 1.0
    backbone, opt = models[0], models[-1]
    weight = models[1] if weight is not None else None
    if ema is not None:
        trainer.ema(ema, backbone, config.ema_decay)
    teacher.to(trainer.device)
    student = teacher.student_of(backbone)
    consistency = teacher.student_of(backbone, FlowConsistencyDenoiser)
    T = teacher.schedule.num_train_timesteps
    grid = scm_flow_grid(config.num_inference_steps, T)
    x_data, y_data = to_device(data, trainer.device)
    with_w = w_conditioning(adapter, backbone, config.guidance_scale, trainer.device)

    def step() -> dict[str, torch.Tensor]:
        idx = trainer.randint(len(x_data), config.batch_size)
        labels = with_w(take(y_data, idx), len(idx))
        warm = min(1.0, trainer.step / config.tangent_warmup) if config.tangent_warmup else 1.0
        loss = scm_loss(student, teacher, weight, x_data[idx], labels, config, warm, trainer)
        out = {"loss": loss.detach()}
        if rcm:
            x = student_sample(x_data[idx].shape, x_data.dtype, labels)
            s = 0.02 + 0.96 * trainer.rand(len(x), torch.float64)
            x_s = teacher.schedule.add_noise(x, trainer.randn(x.shape, x.dtype), s * T)
            with torch.no_grad():
                real = teacher.predict(x_s, s * T, labels)[0]
                grad = dmd_gradient(x, real, fake.predict(x_s, s * T, labels)[0])
            loss_dmd = 0.5 * (x - (x - grad).detach()).pow(2).mean()
            loss = loss + config.dmd_weight * loss_dmd
            out["dmd"] = loss_dmd.detach()
        trainer.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rcm:  # the fake score denoises the student's samples (the flow training loss)
            x = x.detach()
            s = 0.02 + 0.96 * trainer.rand(len(x), torch.float64)
            e = trainer.randn(x.shape, x.dtype)
            x0_hat, e_hat = fake.predict(teacher.schedule.add_noise(x, e, s * T), s * T, labels)
            loss_fake = ((e_hat - x0_hat) - (e - x)).pow(2).mean()
            trainer.backward(loss_fake)
            opt_c.step()
            opt_c.zero_grad(set_to_none=True)
            out["fake"] = loss_fake.detach()
        return out

    def student_sample(shape, dtype, labels) -> torch.Tensor:
        """A sample as the student draws it (fresh noise between steps), with gradients through
        its last step only: k of the N grid steps without them (backward simulation)."""
        k = trainer.same_on_every_process(int(trainer.randint(len(grid) - 1, 1).item()))
        x = trainer.randn(shape, dtype)
        with torch.no_grad():
            for i in range(k):
                x0 = consistency.predict(x, torch.tensor(grid[i]), labels)[0]
                s = grid[i + 1] / T
                x = (1 - s) * x0 + s * trainer.randn(shape, dtype)
        return consistency.predict(x, torch.tensor(grid[k]), labels)[0]

    log = trainer.run(step)
    final = trainer.unwrap(ema if ema is not None else backbone).eval().requires_grad_(False)
    out = teacher.student_of(final, FlowConsistencyDenoiser, solver_steps=1000)
    out.trigflow = True  # type: ignore[attr-defined]
    return out, log  # type: ignore[return-value]


@torch.no_grad()
def sample_scm(
    student: Denoiser,
    x: torch.Tensor,
    steps: int,
    labels=None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multistep sampling on the TrigFlow grid in flow coordinates: x0 = f(z_s, s), then
    z_s' = (1 - s') x0 + s' z with fresh z (``SCMScheduler``'s loop, mapped to flow)."""
    grid = scm_flow_grid(steps, student.schedule.num_train_timesteps)
    x0 = x
    for i, t in enumerate(grid[:-1]):
        x0 = student.predict(x, torch.tensor(t), labels)[0]
        s_next = grid[i + 1] / student.schedule.num_train_timesteps
        if i + 1 < len(grid) - 1:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = (1 - s_next) * x0 + s_next * z
    return x0


def run(ctx: StageContext) -> None:
    config: SCMConfig = ctx.config  # type: ignore[assignment]
    from distill.data import stage_data

    teacher, info = load_teacher(ctx.input.path, "scm", config.guidance_scale, flow=True)
    data = stage_data(ctx, teacher, config.dataset, config.seed)
    student, log = distill(teacher, data, config, ctx.work, ctx.resume, ctx.progress)
    save_student(
        ctx,
        student.backbone,
        TRIGFLOW.scheduler_config(teacher.scheduler_config),
        info.student(
            method="scm",
            num_inference_steps=config.num_inference_steps,
            # w is an input of a student whose backbone takes it, else baked in
            **guidance_info(info, config.guidance_scale, takes_w(student.backbone)),
            consistency=TRIGFLOW.spec(1000),
        ),
        teacher,
        log,
        {"final_loss": mean_tail(log)},
    )
