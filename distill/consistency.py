"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2), in the
discrete-time, guided form of Latent Consistency Models (Luo et al. 2023).

The student is a consistency function f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t), whose
boundary scalings make f(x, 0) = x exactly (LCM's discrete scalings, the ones diffusers'
LCMScheduler applies): with s = timestep_scaling * t,

    c_skip = sigma_data^2 / (s^2 + sigma_data^2),   c_out = s / sqrt(s^2 + sigma_data^2).

Training walks the skipping-step grid t_n = (n + 1) k - 1 (k = T / N, N = ``solver_steps``): from
x_{t_n} = alpha x + sigma eps, one deterministic DDIM step of the (guided) teacher gives
x_hat at t_n - k, and the loss is

    d( f_theta(x_{t_n}, t_n),  f_theta-(x_hat_{t_n - k}, t_n - k) )

with theta- an exponential moving average of theta (the target network) and d either the squared
L2 distance or the pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c of Song & Dhariwal 2023
("Improved Techniques for Training Consistency Models"), c = 0.00054 sqrt(d).
Sampling is Song et al.'s multistep consistency sampling (Algorithm 1): x0 = f(x, t), then
re-noise to the next timestep with fresh noise, which is what LCMScheduler.step does.

Text-to-image teachers (SD, SDXL; epsilon or v) train on ``imagefolder:`` latents, as LCM does on
LAION, or data-free on the teacher's own samples at a prompt list (``prompts:``): the objective
only needs points x0 to noise, and the teacher's samples lie where its ODE goes. The guidance is
baked in (the student takes one unguided pass), so the SD student runs in the stock
``LatentConsistencyModelPipeline`` and the SDXL student in ``StableDiffusionXLPipeline`` with
``LCMScheduler``, both at guidance 1; with the family's w input (SD/SDXL: LCM's
``time_cond_proj_dim`` embedding, added to the student) the student takes w instead.

With ``lora_rank`` the student is LCM-LoRA's (Luo et al. 2023, "LCM-LoRA"): adapters on one frozen
base (``distill.lora``), the teacher the base with its adapters off and the target network
theta- a second adapter, the EMA of the student's (``ema_decay``; diffusers' LCM-LoRA script
takes theta- = theta, which ``ema_decay = 0`` gives). Its guidance is baked in (a LoRA adds no w
input), and it is written as the teacher's pipeline plus ``pytorch_lora_weights.safetensors``.

Flow-matching teachers (SD3; rectified flow, z_s = (1 - s) x0 + s eps): the consistency function
is the flow student's own x0, f(z, s) = z - s v(z, s), which meets the boundary f(z, 0) = z by
its parameterisation (no c_skip/c_out; it is the x0 of diffusers' ``FlowMatchLCMScheduler``, as
in the flow form of LCM used by SANA-Sprint's and FLUX LCM students). The skipping grid is the
teacher's stock ``FlowMatchEulerDiscreteScheduler`` grid at ``solver_steps`` (shift included),
x_hat one guided Euler step of the teacher s_n -> s_{n+1}, the same distance; the student samples
with ``FlowMatchLCMScheduler`` (x0, then re-noise to the next sigma with fresh noise).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch

from accel.core.errors import StageError
from accel.core.stage import StageContext, say
from distill.checkpoint import guidance_info, load_teacher
from distill.configs import ConsistencyConfig
from distill.data import take, to_device
from distill.denoiser import (
    ConsistencyDenoiser,
    Denoiser,
    takes_w,
    w_conditioning,
)
from distill.lora import lora_networks, teacher_dtype
from distill.samplers import ddim_step, flow_grid
from distill.schedule import _bcast
from distill.students import lcm_kind, save_student
from distill.trainer import Trainer, mean_tail


def consistency_grid(num_train_timesteps: int, solver_steps: int) -> list[int]:
    """The skipping-step grid t_n = (n + 1) k - 1, k = T / N: LCMScheduler's origin timesteps."""
    k = num_train_timesteps // solver_steps
    return [(n + 1) * k - 1 for n in range(solver_steps)]


def consistency_pairs(teacher: Denoiser, solver_steps: int) -> torch.Tensor:
    """(t_n, t_n - k) per grid point, shape (N, 2): the discrete skipping grid (t - k clamped at
    0), or for flow teachers consecutive points of the stock ``solver_steps``-step flow grid."""
    if teacher.schedule.kind == "flow":
        g = flow_grid(teacher, solver_steps)
        return torch.tensor(list(zip(g[:-1], g[1:], strict=True)), dtype=torch.float64)
    k = teacher.schedule.num_train_timesteps // solver_steps
    grid = consistency_grid(teacher.schedule.num_train_timesteps, solver_steps)
    return torch.tensor([(t, max(t - k, 0)) for t in grid], dtype=torch.long)


def distance(a: torch.Tensor, b: torch.Tensor, kind: Literal["l2", "huber"]) -> torch.Tensor:
    """Per-sample distance: squared L2 (mean over pixels) or pseudo-Huber."""
    diff2 = (a - b).pow(2).flatten(1).mean(1)
    if kind == "l2":
        return diff2
    c = 0.00054 * (a[0].numel() ** 0.5)
    # Song & Dhariwal's distance on the sum of squares; the mean keeps it scale-free in d
    return (diff2 * a[0].numel() + c**2).sqrt() - c


def consistency_loss(
    student: ConsistencyDenoiser,
    target: ConsistencyDenoiser,
    teacher: Denoiser,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    pairs: torch.Tensor,
    kind: Literal["l2", "huber"],
    rng: Trainer,
) -> torch.Tensor:
    """One batch of the consistency distillation objective (Algorithm 2's loss term) over the
    (t, t_prev) ``pairs`` of ``consistency_pairs``."""
    sched = teacher.schedule
    t, t_prev = pairs[rng.randint(len(pairs), len(x0))].unbind(1)
    x_t = sched.add_noise(x0, rng.randn(x0.shape, x0.dtype), t)
    with torch.no_grad():
        x0_teacher, eps_teacher = teacher.predict(x_t, t, labels)
        a_prev, s_prev = (_bcast(v, x0) for v in sched.alpha_sigma(t_prev))
        x_prev = a_prev * x0_teacher + s_prev * eps_teacher  # one DDIM (flow: Euler) step
        goal = target.predict(x_prev, t_prev, labels)[0]
        if sched.kind == "flow":  # the boundary itself: f(z, 0) = z (not 0 * v of a net at s = 0)
            goal = torch.where((t_prev == 0).reshape(-1, *[1] * (x0.dim() - 1)), x_prev, goal)
    return distance(student.predict(x_t, t, labels)[0], goal, kind).mean()


def distill(
    teacher: Denoiser,
    data: tuple[torch.Tensor, torch.Tensor],
    config: ConsistencyConfig,
    work: Path | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = say,
) -> tuple[ConsistencyDenoiser, list[dict[str, float]]]:
    """Train a consistency student initialised from the teacher's backbone; the teacher's
    guidance (if any) is distilled in, so the student takes one unguided pass."""
    trainer = Trainer("consistency", config, config.iterations, work, resume, progress=progress)
    sched = teacher.schedule
    teacher.labels_carry_guidance = teacher.guidance_scales is not None
    adapter = teacher.adapter
    if config.lora_rank:  # one frozen base: the teacher, the student and the EMA target
        backbone, ema, trained, averaged = lora_networks(teacher, config, trainer, ("ema",))
        embedded = None  # the guidance is baked in: a LoRA adds no w input
        opt = torch.optim.Adam(trained.parameters(), lr=config.learning_rate)
        _, opt = trainer.prepare(backbone.base, opt)
        trainer.ema(averaged, trained, config.ema_decay)
    else:
        backbone = copy.deepcopy(teacher.backbone)
        embedded = None if takes_w(backbone) else adapter.with_guidance_input(backbone)
        backbone = (embedded or backbone).requires_grad_(True).train()
        ema = copy.deepcopy(backbone).requires_grad_(False)
        opt = torch.optim.Adam(backbone.parameters(), lr=config.learning_rate)
        backbone, opt = trainer.prepare(backbone, opt)
        trainer.ema(ema, backbone, config.ema_decay)
    trainer.place_teacher(teacher)

    kind = lcm_kind(sched.kind == "flow").wrapper

    def consistency(net: torch.nn.Module) -> ConsistencyDenoiser:
        return teacher.student_of(net, kind, solver_steps=config.solver_steps)  # type: ignore[return-value]

    student, target = consistency(backbone), consistency(ema)
    pairs = consistency_pairs(teacher, config.solver_steps).to(trainer.device)
    x_data, y_data = to_device(data, trainer.device)
    # a student with a w input (LCM's embedding) learns the teacher guided at w, given w
    with_w = w_conditioning(adapter, embedded, config.guidance_scale, trainer.device)

    def step() -> dict[str, torch.Tensor]:
        idx = trainer.randint(len(x_data), config.batch_size)
        labels = take(y_data, idx)
        if isinstance(labels, torch.Tensor):
            labels = teacher.training_labels(labels, trainer.randint)
        else:
            labels = with_w(labels, len(idx))
        loss = consistency_loss(
            student, target, teacher, x_data[idx], labels, pairs, config.loss, trainer
        )
        trainer.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    log = trainer.run(step)
    student = consistency(trainer.unwrap(backbone).eval().requires_grad_(False))
    student.labels_carry_guidance = False
    return student, log


@torch.no_grad()
def sample_consistency(
    denoiser: ConsistencyDenoiser,
    x: torch.Tensor,
    timesteps: Sequence[int],
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x0 = f(x, t_i), then
    x = alpha(t_{i+1}) x0 + sigma(t_{i+1}) z with fresh noise z, step for step LCMScheduler.step."""
    x0 = x
    for i, t in enumerate(timesteps):
        x0 = denoiser.predict(x, torch.tensor(t), labels)[0]
        if i + 1 < len(timesteps):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = ddim_step(x0, z, denoiser.schedule, timesteps[i + 1])
    return x0


def run(ctx: StageContext) -> None:
    config: ConsistencyConfig = ctx.config  # type: ignore[assignment]
    from distill.data import stage_data

    teacher, info = load_teacher(
        ctx.input.path, "consistency", config.guidance_scale, flow=True, dtype=teacher_dtype(config)
    )
    flow = teacher.schedule.kind == "flow"
    T = teacher.schedule.num_train_timesteps
    if not flow and T % config.solver_steps:
        raise StageError(
            "consistency", f"solver_steps={config.solver_steps} must divide the {T} timesteps"
        )
    data = stage_data(ctx, teacher, config.dataset, config.seed)
    student, log = distill(teacher, data, config, ctx.work, ctx.resume, ctx.progress)
    save_student(
        ctx,
        student.backbone,
        lcm_kind(flow).scheduler_config(teacher.scheduler_config, solver_steps=config.solver_steps),
        info.student(
            method="consistency",
            num_inference_steps=config.num_inference_steps,
            # w is an input of a student whose backbone takes it, else baked in
            **guidance_info(info, config.guidance_scale, takes_w(student.backbone)),
            consistency=lcm_kind(flow).spec(config.solver_steps),
        ),
        teacher,
        log,
        {"final_loss": mean_tail(log)},
    )
