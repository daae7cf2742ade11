"""Reference samplers, one plain function each: ``sampler(denoiser, x, timesteps, labels) -> x0``.

``timesteps`` is a list of (t, t_prev) pairs (``Schedule.ddim_timesteps(n)``); t_prev = -1 is clean data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from accel.core.errors import CheckpointError, RecipeError
from accel.core.model_info import ModelInfo
from accel.core.plan import SamplerPlan
from distill.denoiser import Denoiser, sample_shape
from distill.schedule import Schedule, _bcast


def _alpha_sigma(
    schedule: Schedule, t: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    alpha, sigma = schedule.alpha_sigma(torch.tensor([t]))
    return _bcast(alpha, like), _bcast(sigma, like)


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    schedule: Schedule,
    t_prev: int,
    eta: float = 0.0,
    t: int | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update (Song et al. 2021, eq. 12): x_prev = alpha' x0 + sqrt(sigma'^2 - s^2) eps + s z,
    s = eta sqrt(sigma'^2 / sigma^2 (1 - alpha^2 / alpha'^2)); eta = 0 is the deterministic ODE step."""
    a_prev, s_prev = _alpha_sigma(schedule, t_prev, x0)
    if eta == 0.0:
        return a_prev * x0 + s_prev * eps
    assert t is not None and noise is not None, "stochastic DDIM needs t and noise"
    a, s = _alpha_sigma(schedule, t, x0)
    std = eta * ((s_prev**2 / s**2) * (1 - a**2 / a_prev**2)).clamp(min=0).sqrt()
    return a_prev * x0 + (s_prev**2 - std**2).clamp(min=0).sqrt() * eps + std * noise


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[tuple[int, int]],
    labels: torch.Tensor | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, Denoising Diffusion Implicit Models), step for step what
    diffusers' DDIMScheduler.step computes with clip_sample=False."""
    for t, t_prev in timesteps:
        x0, eps = denoiser.predict(x, torch.tensor(t), labels)
        noise = None if eta == 0.0 else torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = ddim_step(x0, eps, denoiser.schedule, t_prev, eta=eta, t=t, noise=noise)
    return x


def _ode_state(schedule: Schedule, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probability-flow ODE as dy/ds = d: for VP schedules y = x / alpha, s = sigma / alpha and
    d = eps (Karras et al. 2022, eq. 4 with s(t) = alpha); for flow matching y = x, s = sigma and
    d = eps - x0 (the velocity)."""
    alpha, sigma = _alpha_sigma(schedule, t, x)
    if schedule.kind == "flow":
        return x, sigma
    return x / alpha, sigma / alpha


def _ode_x(schedule: Schedule, y: torch.Tensor, t: int) -> torch.Tensor:
    return y if schedule.kind == "flow" else y * _alpha_sigma(schedule, t, y)[0]


def _ode_slope(schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0 if schedule.kind == "flow" else eps


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[tuple[int, int]],
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euler steps on the probability-flow ODE (Karras et al. 2022, Algorithm 1 with Euler only).
    In these coordinates an Euler step equals a deterministic DDIM step (Song et al. 2021, sec. 4.3)."""
    sched = denoiser.schedule
    for t, t_prev in timesteps:
        x0, eps = denoiser.predict(x, torch.tensor(t), labels)
        y, s = _ode_state(sched, x, t)
        s_prev = _ode_state(sched, x, t_prev)[1]
        x = _ode_x(sched, y + (s_prev - s) * _ode_slope(sched, x0, eps), t_prev)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[tuple[int, int]],
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1):
    an Euler step, then the average of the slopes at both ends; the last step onto clean data
    (t_prev = -1) stays Euler, as in the paper."""
    sched = denoiser.schedule
    for t, t_prev in timesteps:
        x0, eps = denoiser.predict(x, torch.tensor(t), labels)
        y, s = _ode_state(sched, x, t)
        s_prev = _ode_state(sched, x, t_prev)[1]
        d = _ode_slope(sched, x0, eps)
        y_next = y + (s_prev - s) * d
        if t_prev >= 0:
            x0_2, eps_2 = denoiser.predict(
                _ode_x(sched, y_next, t_prev), torch.tensor(t_prev), labels
            )
            y_next = y + (s_prev - s) * (d + _ode_slope(sched, x0_2, eps_2)) / 2
        x = _ode_x(sched, y_next, t_prev)
    return x


SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "heun": sample_heun}


def ddim_coefficients(schedule: Schedule, steps: int) -> list[dict[str, float]]:
    """Deterministic DDIM as x_prev = a * x + b * x0_hat per step, for a sampler plan that runs with
    numpy alone: eps = (x - alpha x0) / sigma gives a = sigma' / sigma, b = alpha' - a * alpha."""
    plan = []
    for t, t_prev in schedule.ddim_timesteps(steps):
        alpha, sigma = (v.item() for v in schedule.alpha_sigma(torch.tensor([t])))
        alpha_p, sigma_p = (v.item() for v in schedule.alpha_sigma(torch.tensor([t_prev])))
        a = sigma_p / sigma
        plan.append({"timestep": t, "a": a, "b": alpha_p - a * alpha})
    return plan


def flow_coefficients(grid: list[float], num_train_timesteps: int) -> list[dict[str, float]]:
    """Euler steps of the flow ODE dx/ds = v (Liu et al. 2022; Esser et al. 2024) over the grid of
    flow timesteps t = sigma * T (the last one 0), as x_next = a x + b x0_hat: with
    v = (x - x0_hat) / s, x + (s' - s) v = (s'/s) x + (1 - s'/s) x0_hat, which is diffusers'
    FlowMatchEulerDiscreteScheduler.step."""
    plan = []
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        a = (t_next / num_train_timesteps) / (t / num_train_timesteps)
        plan.append({"timestep": t, "a": a, "b": 1.0 - a})
    return plan


def flow_grid(denoiser: Denoiser, steps: int) -> list[float]:
    """The ``steps + 1`` flow timesteps (sigma * T, the last 0) the model's stock scheduler visits
    at its default resolution (a bare backbone: ``FlowMatchEulerDiscreteScheduler`` with the
    schedule's shift)."""
    if not denoiser.adapter.pixel:
        return denoiser.adapter.timestep_grid(steps, *denoiser.adapter.default_resolution())
    from diffusers import FlowMatchEulerDiscreteScheduler

    T = denoiser.schedule.num_train_timesteps
    config = denoiser.scheduler_config or {
        "num_train_timesteps": T,
        "shift": denoiser.schedule.shift,
    }
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sched.set_timesteps(steps)
    return [float(v) * T for v in sched.sigmas.double().tolist()]


def consistency_timesteps(num_train_timesteps: int, solver_steps: int, steps: int) -> list[int]:
    """The timesteps of ``steps``-step consistency sampling, as LCMScheduler.set_timesteps picks
    them: evenly spaced (floored) indices into the reversed skipping-step grid (n + 1) k - 1."""
    k = num_train_timesteps // solver_steps
    if not 1 <= steps <= solver_steps:
        raise RecipeError(f"consistency sampling takes 1 to {solver_steps} steps, got {steps}")
    grid = [(n + 1) * k - 1 for n in range(solver_steps)][::-1]
    return [grid[int(i)] for i in torch.linspace(0, solver_steps, steps + 1)[:-1].floor().tolist()]


def consistency_coefficients(
    schedule: Schedule, timesteps: list[int] | list[float]
) -> list[dict[str, float]]:
    """Multistep consistency sampling as x_next = a x + b x0_hat + c z: a = 0, b = alpha(t_next),
    c = sigma(t_next) (fresh noise z), and x0_hat itself after the last step (flow schedules:
    b = 1 - s', c = s', FlowMatchLCMScheduler.step)."""
    plan = []
    for i, t in enumerate(timesteps):
        if i + 1 < len(timesteps):
            alpha, sigma = (
                v.item() for v in schedule.alpha_sigma(torch.tensor([timesteps[i + 1]]))
            )
            plan.append({"timestep": t, "a": 0.0, "b": alpha, "c": sigma})
        else:
            plan.append({"timestep": t, "a": 0.0, "b": 1.0, "c": 0.0})
    return plan


def sampler_plan(
    denoiser: Denoiser,
    steps: int,
    info: ModelInfo | None = None,
    resolution: tuple[int, int] | None = None,
) -> SamplerPlan:
    """The deterministic DDIM run of ``denoiser`` over its x0 graph (Euler steps for flow models)
    as a numpy-only SamplerPlan; adapter models at ``resolution`` (default: the model's own).
    ``info`` (the model's ``accel.json``) gives the class count of the digits models and the
    quality metric and evaluation prompts every plan records."""
    info = info or ModelInfo()
    evaluation = info.evaluation
    judged = {
        "metric": evaluation.metric if evaluation else None,
        "evaluation_prompts": evaluation.prompts if evaluation else None,
    }
    if denoiser.adapter.pixel:
        return replace(_pixel_plan(denoiser, steps, info), **judged)
    return replace(_adapter_plan(denoiser, steps, resolution), **judged)


def _pixel_plan(denoiser: Denoiser, steps: int, info: ModelInfo) -> SamplerPlan:
    """A pixel UNet's plan: one size, class labels counted by ``accel.json``'s ``num_classes``
    (the label table's other rows are the null class and, guidance-distilled, the w grid)."""
    from distill.students import kind_of_denoiser

    num_classes = info.num_classes
    kind = kind_of_denoiser(denoiser)
    if kind.flow:  # the flow kinds' grids are their family adapter's
        raise CheckpointError(
            f"a pixel-space model samples on a discrete VP schedule; this one is a {kind.name} "
            "model, whose sampling grid needs a family adapter"
        )
    coefficients, sampler, _ = kind.steps(denoiser, steps)
    labelled = denoiser.class_conditional and num_classes is not None
    return SamplerPlan(
        steps=coefficients,
        sample_shape=sample_shape(denoiser.backbone),
        guidance_scale=denoiser.guidance_scale,
        null_label=denoiser.null_label,
        num_classes=num_classes,
        sampler=sampler,
        prediction_type=denoiser.prediction_type,
        # guidance-distilled graphs take w as an input: one pass, no doubled batch
        guidance_input=denoiser.guidance_scales is not None,
        conditioning={"class_labels": {"axes": ["batch"], "dtype": "int64"}} if labelled else {},
        conditioning_kind="class" if labelled else None,
    )


def _adapter_plan(
    denoiser: Denoiser, steps: int, resolution: tuple[int, int] | None
) -> SamplerPlan:
    adapter = denoiser.adapter
    h, w = resolution or adapter.default_resolution()
    adapter.check_resolution(h, w)
    schedule = denoiser.schedule
    from distill.students import kind_of_denoiser

    coefficients, sampler, shift = kind_of_denoiser(denoiser).steps(denoiser, steps, (h, w))
    flow_shift = adapter.flow_shift(steps, h, w) if shift is None else shift
    num_classes = getattr(adapter, "num_classes", None) if adapter.conditioning == "class" else None
    null_label = None
    if num_classes is not None:  # the null class of guidance (DiT: the table's extra row)
        null_label = int(adapter.null_conditioning(h, w)["class_labels"][0])
    return SamplerPlan(
        steps=coefficients,
        sample_shape=adapter.latent_shape(h, w),
        guidance_scale=denoiser.guidance_scale,
        null_label=null_label,
        num_classes=num_classes,
        sampler=sampler,
        prediction_type=denoiser.prediction_type,
        family=adapter.family,
        conditioning={k: v.to_json() for k, v in adapter.conditioning_spec().items()},
        conditioning_kind=adapter.conditioning,
        timestep_dtype="float32" if schedule.kind == "flow" else "int64",
        guidance_in_model=adapter.guidance_in_model,
        decode=True,
        resolution=[h, w],
        flow_shift=flow_shift,
    )


TEACHER_SAMPLE_STEPS = 25
"""DDIM steps of the teacher samples that stand in for data (``prompts:`` sources)."""


@torch.no_grad()
def teacher_samples(
    teacher: Denoiser, prompts: list[str], steps: int, seed: int, chunk: int = 16
) -> torch.Tensor:
    """x0 of a text-conditioned teacher at ``prompts``: its ``steps``-step DDIM (flow: Euler) run with its
    guidance, from noise seeded by ``seed`` (the data of data-free distillation, ``prompts:``)."""
    adapter = teacher.adapter
    h, w = adapter.default_resolution()
    gen = torch.Generator().manual_seed(seed)
    if teacher.schedule.kind == "flow":  # DDIM on a flow schedule is the Euler step
        g = adapter.timestep_grid(steps, h, w)
        grid = list(zip(g[:-1], g[1:], strict=True))
    else:
        grid = teacher.schedule.ddim_timesteps(steps)
    out = []
    for i in range(0, len(prompts), chunk):
        part = prompts[i : i + chunk]
        noise = torch.randn((len(part), *adapter.latent_shape(h, w)), generator=gen)
        cond = adapter.encode(part, height=h, width=w)
        out.append(sample_ddim(teacher, noise, grid, cond))
    return torch.cat(out)
