"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2).

Each round halves the step count: a student initialised from the teacher learns to cover in one
deterministic DDIM step what the teacher covers in two. For z_t = alpha_t x + sigma_t eps and the
teacher's two DDIM steps t -> t' -> t'' (t' halfway), the student's x-space target is the x0 that
makes one DDIM step from z_t land on the teacher's z_t'':

    x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

and the loss is the truncated-SNR weighted regression
L = max(alpha_t^2 / sigma_t^2, 1) * ||x_tilde - x_hat(z_t)||^2, with t drawn from the student's grid.

The first round distils the classifier-free-guided teacher at the fixed guidance scale of the
config (guidance is baked in: the student takes one unguided pass; Meng et al. 2023's w-conditioned
students are a separate stage). Steps follow diffusers' trailing DDIM grid, t -> t - T // N, so the
student's ``DDIMScheduler`` (written beside it) reproduces accel's sampler in a plain diffusers loop.
As in the paper the learning rate decays linearly to zero within each round.

Flow-matching teachers (rectified flow, Liu et al. 2022; SD3/Flux, Esser et al. 2024): with
z_s = (1 - s) x + s eps, a DDIM step from (x0_hat, eps_hat) is exactly an Euler step of the flow
ODE dz/ds = v = eps - x0, so the same target applies with the teacher's two Euler steps
s -> (s + s'') / 2 -> s'' and the x_tilde above (alpha = 1 - s, sigma = s). The student's grid
s -> s'' is the one its stock ``FlowMatchEulerDiscreteScheduler`` visits at N steps (shift,
and the dynamic shift at the model's default resolution, included), as FLUX.1-schnell is
sampled; the teacher's midpoint is the middle in sigma (the 2N-step stock grid, whose points do
not nest with the N-step one's, is not needed: Algorithm 2 only asks that one student step match
two teacher steps). The weight max(SNR, 1) uses the flow SNR ((1 - s) / s)^2.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from accel.core.errors import StageError
from accel.core.stage import StageContext, say
from distill.checkpoint import guidance_info, load_teacher
from distill.configs import ProgressiveConfig
from distill.data import take, to_device
from distill.denoiser import Denoiser, takes_w
from distill.samplers import flow_grid
from distill.schedule import _bcast
from distill.students import euler_kind, save_student
from distill.trainer import Trainer, mean_tail, seeded_generator, write_loss_log

MIN_EPSILON_ALPHA_RATIO = 1e-2
"""Epsilon teachers are distilled where alpha/sigma at the last timestep is at least this (SD's
scaled-linear schedule: 0.068), so x0 = (z - sigma eps) / alpha stays a bounded function of
eps; schedules ending at (near) zero SNR need v- or x0-prediction (Salimans & Ho 2022, sec. 4)."""


def progressive_target(
    teacher: Denoiser,
    z_t: torch.Tensor,
    t: torch.Tensor,
    t_mid: torch.Tensor,
    t_end: torch.Tensor,
    labels: torch.Tensor | None,
) -> torch.Tensor:
    """x_tilde: two teacher DDIM (for flow: Euler) steps t -> t_mid -> t_end, then the x0 a single
    step from t would need to land there (``student_grid`` gives the three timesteps)."""
    sched = teacher.schedule

    def ab(tt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(_bcast(v, z_t) for v in sched.alpha_sigma(tt))  # type: ignore[return-value]

    x0, eps = teacher.predict(z_t, t, labels)
    a_mid, s_mid = ab(t_mid)
    z_mid = a_mid * x0 + s_mid * eps
    x0, eps = teacher.predict(z_mid, t_mid, labels)
    a_end, s_end = ab(t_end)
    z_end = a_end * x0 + s_end * eps
    a_t, s_t = ab(t)
    ratio = s_end / s_t
    return (z_end - ratio * z_t) / (a_end - ratio * a_t)


def student_grid(teacher: Denoiser, student_steps: int) -> torch.Tensor:
    """(t, t_mid, t_end) per student step, shape (N, 3). Discrete: diffusers' trailing DDIM grid,
    t -> t - T // (2N) -> t - T // N; the end point is where an N-step DDIMScheduler goes next, and
    the midpoint equals its 2N-step grid when 2N divides T (one timestep off for 16 steps at T =
    1000: 937 -> 874 rather than 875). Flow: the stock N-step grid, the midpoint in sigma."""
    sched = teacher.schedule
    if sched.kind == "flow":
        g = flow_grid(teacher, student_steps)
        rows = [(t, (t + t_end) / 2, t_end) for t, t_end in zip(g[:-1], g[1:], strict=True)]
        return torch.tensor(rows, dtype=torch.float64)
    T = sched.num_train_timesteps
    rows = [
        (t, t - T // (2 * student_steps), t_end) for t, t_end in sched.ddim_timesteps(student_steps)
    ]
    return torch.tensor(rows, dtype=torch.long)


def distill_round(
    teacher: Denoiser,
    data: tuple[torch.Tensor, torch.Tensor],
    student_steps: int,
    config: ProgressiveConfig,
    work: Path | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = say,
    generator: torch.Generator | None = None,
) -> tuple[Denoiser, list[dict[str, float]]]:
    """One halving: returns a student for ``student_steps`` steps (guidance baked in) and its
    loss log. ``generator`` (default: seeded with config.seed) carries on across rounds."""
    trainer = Trainer(
        "progressive",
        config,
        config.iterations_per_round,
        work,
        resume,
        desc=f"progressive {2 * student_steps}->{student_steps}",
        progress=progress,
        generator=generator,
    )
    sched = teacher.schedule
    teacher.labels_carry_guidance = teacher.guidance_scales is not None
    backbone = copy.deepcopy(teacher.backbone).requires_grad_(True).train()
    opt = torch.optim.Adam(backbone.parameters(), lr=config.learning_rate)
    n = config.iterations_per_round
    lr_decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / n)
    backbone, opt, lr_decay = trainer.prepare(backbone, opt, lr_decay)
    trainer.place_teacher(teacher)
    student = teacher.student_of(backbone)
    grid = student_grid(teacher, student_steps).to(trainer.device)
    x_data, y_data = to_device(data, trainer.device)

    def step() -> dict[str, torch.Tensor]:
        idx = trainer.randint(len(x_data), config.batch_size)
        x0, labels = x_data[idx], take(y_data, idx)
        if isinstance(labels, torch.Tensor):
            labels = teacher.training_labels(labels, trainer.randint)
        t, t_mid, t_end = grid[trainer.randint(student_steps, config.batch_size)].unbind(1)
        z_t = sched.add_noise(x0, trainer.randn(x0.shape, x0.dtype), t)
        with torch.no_grad():
            target = progressive_target(teacher, z_t, t, t_mid, t_end, labels)
        x_hat = student.predict(z_t, t, labels)[0]
        weight = _bcast(sched.snr(t).clamp(min=1.0), x0)
        loss = (weight * (target - x_hat) ** 2).mean()
        trainer.backward(loss)
        opt.step()
        lr_decay.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    log = trainer.run(step)
    backbone = trainer.unwrap(backbone).eval().requires_grad_(False)
    return teacher.student_of(backbone), log


def run(ctx: StageContext) -> None:
    config: ProgressiveConfig = ctx.config  # type: ignore[assignment]
    from safetensors.torch import load_file, save_file

    from distill.data import stage_data

    teacher, info = load_teacher(
        ctx.input.path, "progressive", config.guidance_scale, students=("progressive",), flow=True
    )
    flow = teacher.schedule.kind == "flow"
    if info.num_inference_steps not in (None, config.teacher_steps):
        raise StageError(
            "progressive",
            f"the input is a {info.num_inference_steps}-step progressive student: set "
            f"teacher_steps = {info.num_inference_steps} to halve it further",
        )
    T = teacher.schedule.num_train_timesteps
    alpha_T, sigma_T = (float(v) for v in teacher.schedule.alpha_sigma(torch.tensor([T - 1])))
    if (
        not flow
        and teacher.prediction_type == "epsilon"
        and alpha_T / sigma_T < MIN_EPSILON_ALPHA_RATIO
    ):
        raise StageError(
            "progressive",
            "the teacher predicts epsilon and its schedule ends near SNR 0 (alpha/sigma = "
            f"{alpha_T / sigma_T:.1e} at t = {T - 1}); its x0 = (z - sigma eps) / alpha is "
            "ill-posed there, which few-step students start from (Salimans & Ho 2022, sec. 4): "
            "use a v_prediction or sample-prediction teacher",
        )
    data = stage_data(ctx, teacher, config.dataset, config.seed, config.teacher_steps)
    steps = config.teacher_steps // 2
    rounds = []
    gen = seeded_generator(config.seed)  # one stream through all rounds
    while steps >= config.student_steps:
        # each finished round is kept in the work dir, so --resume skips it
        work = ctx.work / f"round-{steps}" if ctx.work is not None else None
        done = work / "student.safetensors" if work is not None else None
        t0 = time.perf_counter()
        if ctx.resume and done is not None and done.is_file():
            teacher = teacher.student_of(copy.deepcopy(teacher.backbone))
            teacher.backbone.load_state_dict(load_file(str(done)))
            gen.set_state(load_file(str(work / "generator.safetensors"))["state"])
            log = json.loads((work / "loss_log.json").read_text())
        else:
            teacher, log = distill_round(
                teacher, data, steps, config, work, ctx.resume, ctx.progress, gen
            )
            if done is not None:
                work.mkdir(parents=True, exist_ok=True)
                save_file({"state": gen.get_state()}, str(work / "generator.safetensors"))
                write_loss_log(work, log)
                save_file(teacher.backbone.state_dict(), str(done))  # last: marks the round done
        rounds.append(
            {
                "student_steps": steps,
                "seconds": time.perf_counter() - t0,
                "final_loss": mean_tail(log),
                "losses": log,
            }
        )
        ctx.progress(
            f"progressive: {steps * 2} -> {steps} steps, loss {rounds[-1]['final_loss']:.4f}"
        )
        steps //= 2
    save_student(
        ctx,
        teacher.backbone,
        euler_kind(flow).scheduler_config(teacher.scheduler_config),
        info.student(
            method="progressive",
            num_inference_steps=config.student_steps,
            **guidance_info(info, config.guidance_scale, takes_w(teacher.backbone)),
        ),
        teacher,
        {"rounds": rounds},
        {"rounds": [{k: v for k, v in r.items() if k != "losses"} for r in rounds]},
    )
