"""Adversarial Diffusion Distillation: ADD (Sauer et al. 2023, "Adversarial Diffusion
Distillation"), with its discriminator on frozen teacher features as in LADD (Sauer et al. 2024,
"Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation").

The student x_theta (initialised from the teacher, or from a student it distilled, with the
boundary condition c_skip/c_out inside its adapter) denoises real images noised to a timestep s of
its grid, ADD's T_student (for 4 steps 999, 749, 499, 249: the LCMScheduler grid of
``student_steps``). Its objective (ADD eq. 4-5) is

    L_G = -E[ D(x_theta) ] + lambda E_t[ c(t) || x_theta - sg(x_psi(x_theta,t, t)) ||_2^2 ],
    x_theta,t = alpha_t x_theta + sigma_t eps,

with lambda = ``distillation_weight`` (2.5 in ADD), t uniform over the teacher's timesteps, x_psi
the frozen teacher's (classifier-free guided) x0 prediction of the re-noised student sample, and
ADD's exponential weighting c(t) = alpha_t. The discriminator D is a trainable head on the frozen
teacher's ``feature_module`` output (its bottleneck) for a sample noised to t_D ~ U[min, max] T and
its class label, so its features are conditioned as the teacher is. It minimises ADD's hinge loss
(eq. 3) with an R1 penalty on real data,

    L_D = E[ max(0, 1 - D(x_real)) ] + E[ max(0, 1 + D(x_theta)) ] + gamma E[ ||grad_x D(x_real)||^2 ]

gamma = ``r1_weight`` (1e-5 in ADD), one discriminator update per generator update. Students are
LCMScheduler checkpoints (as DMD2's): one step from pure noise at t = T - 1, or multistep sampling
that re-noises in between.

Latent pipelines (SD, SDXL, SD3, Flux, PixArt, Sana) take LADD's form: the real images are VAE
latents (``imagefolder:``) or the teacher's own samples (``prompts:``), the discriminator reads the
frozen teacher's features at noised latents (a transformer's middle block MLP, a UNet's
``mid_block``), and the students are those of DMD2: ``FlowMatchLCMScheduler`` checkpoints (x0 =
z - s v, the stock grid with the teacher's shift) for flow teachers, LCM-form ones with the w
embedding for SD and SDXL.

Deviations: ADD's feature network is a frozen DINOv2 ViT-S on clean images with heads on several
layers; here it is the frozen teacher itself (LADD's choice, as the issue asks) with one head on its
bottleneck. The R1 gradient is taken with respect to the noised real input of the feature network.
The teacher's full forward pass runs though only the bottleneck is read.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from accel.core.stage import StageContext, say
from distill.configs import AddConfig
from distill.data import concat, take, to_device
from distill.denoiser import (
    ConsistencyDenoiser,
    Denoiser,
)
from distill.gan import Discriminator, FeatureTap, feature_module, find_teacher, generator_with_w
from distill.samplers import consistency_timesteps, flow_grid
from distill.students import lcm_kind, save_lcm_student
from distill.trainer import Trainer


def distill(
    teacher: Denoiser,
    student_init: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    config: AddConfig,
    work: Path | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = say,
) -> tuple[ConsistencyDenoiser, list[dict[str, float]]]:
    """Train a ``student_steps``-step ADD student; returns it and the loss log."""
    trainer = Trainer("add", config, config.iterations, work, resume, progress=progress)
    sched, ptype = teacher.schedule, teacher.prediction_type
    T, N = sched.num_train_timesteps, config.student_steps
    flow = sched.kind == "flow"
    x_data, y_data = to_device(data, trainer.device)
    trainer.place_teacher(teacher, frozen=False).backbone.requires_grad_(False)
    adapter = teacher.adapter
    # one unguided pass of the frozen teacher, for features (LADD: at noised latents)
    feature_net = Denoiser(teacher.backbone, sched, ptype, adapter=adapter)
    tap = FeatureTap(teacher.backbone, config.feature_module or feature_module(teacher.backbone))
    with torch.no_grad():
        probe = torch.arange(2, device=trainer.device)
        feature_net.raw(x_data[:2], torch.full((2,), float(T - 1)), take(y_data, probe))
    assert tap.value is not None
    disc = Discriminator(tap.value.shape).to(x_data.dtype)
    g_net, with_w = generator_with_w(adapter, student_init, config.guidance_scale, trainer.device)

    def conditioning(idx: torch.Tensor):
        return with_w(take(y_data, idx), len(idx))

    kw = {"betas": config.adam_betas, "weight_decay": config.weight_decay}
    opt_g = torch.optim.AdamW(g_net.parameters(), lr=config.learning_rate, **kw)
    lr_d = config.discriminator_learning_rate or config.learning_rate
    opt_d = torch.optim.AdamW(disc.parameters(), lr=lr_d, **kw)
    g_net, disc, opt_g, opt_d = trainer.prepare(g_net, disc, opt_g, opt_d)
    kind = lcm_kind(flow).wrapper
    student = kind(g_net, sched, ptype, solver_steps=N, adapter=adapter)
    # its sampling grid: LCMScheduler's, or FlowMatchLCMScheduler's (flow time, shift included)
    timesteps = flow_grid(teacher, N)[:-1] if flow else consistency_timesteps(T, N, N)
    grid = torch.tensor(timesteps, device=trainer.device)

    def draw_t(n: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
        """Timesteps in [lo T, hi T): integers, or continuous flow time."""
        if flow:
            return (lo + (hi - lo) * trainer.rand(n, torch.float64)) * T
        return int(lo * T) + trainer.randint(int(hi * T) - int(lo * T), n)

    def noised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = draw_t(len(x), config.min_timestep, config.max_timestep)
        return sched.add_noise(x, trainer.randn(x.shape, x.dtype), t), t

    def step() -> dict[str, torch.Tensor]:
        idx = trainer.randint(len(x_data), config.batch_size)
        x0, y = x_data[idx], conditioning(idx)
        s = grid[trainer.randint(N, len(idx))]
        x = student.predict(sched.add_noise(x0, trainer.randn(x0.shape, x0.dtype), s), s, y)[0]

        # the student: fool D, and match the teacher's denoising of its re-noised sample
        t = draw_t(len(x))
        with torch.no_grad():
            x_t = sched.add_noise(x, trainer.randn(x.shape, x.dtype), t)
            target = teacher.predict(x_t, t, y)[0]
        c = sched.alpha_sigma(t)[0].to(x.dtype)
        dims = tuple(range(1, x.dim()))
        # ADD's d(x, y) = ||x - y||_2^2: a sum over the sample, not a mean (lambda = 2.5 is set
        # against it; a mean made the adversarial term 256x heavier on 16x16 digits)
        loss_distill = (c * (x - target).pow(2).sum(dims)).mean()
        x_d, t_d = noised(x)
        feature_net.raw(x_d, t_d, y)
        loss_adv = -disc(tap.value).mean()
        trainer.backward(
            config.adversarial_weight * loss_adv + config.distillation_weight * loss_distill
        )
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)  # the generator's loss reached D: not its update

        # the discriminator: hinge loss on noisy real vs generated features, in one pass
        real = trainer.randint(len(x_data), config.batch_size)
        fake_t, t_f = noised(x.detach())
        real_t, t_r = noised(x_data[real])
        real_t.requires_grad_(config.r1_weight > 0)
        # R1 differentiates twice through the teacher: only the math attention kernel can
        with sdpa_kernel(SDPBackend.MATH) if config.r1_weight > 0 else nullcontext():
            feature_net.raw(
                torch.cat([fake_t, real_t]), torch.cat([t_f, t_r]), concat(y, conditioning(real))
            )
        d = disc(tap.value)
        d_fake, d_real = d[: len(x)], d[len(x) :]
        loss_d = F.relu(1 + d_fake).mean() + F.relu(1 - d_real).mean()
        losses = {"distill": loss_distill.detach(), "adv_generator": loss_adv.detach()}
        if config.r1_weight > 0:
            (grad,) = torch.autograd.grad(d_real.sum(), real_t, create_graph=True)
            r1 = grad.pow(2).sum(dims).mean()
            loss_d = loss_d + config.r1_weight * r1
            losses["r1"] = r1.detach()
        trainer.backward(loss_d)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        return {**losses, "discriminator": loss_d.detach()}

    log = trainer.run(step)
    g_net = trainer.unwrap(g_net).eval().requires_grad_(False)
    return kind(g_net, sched, ptype, solver_steps=N, adapter=adapter), log  # type: ignore[return-value]


def run(ctx: StageContext) -> None:
    config: AddConfig = ctx.config  # type: ignore[assignment]
    from distill.data import stage_data

    teacher, init, info = find_teacher(ctx, config.guidance_scale, "add")
    data = stage_data(ctx, teacher, config.dataset, config.seed)
    student, log = distill(teacher, init, data, config, ctx.work, ctx.resume, ctx.progress)
    save_lcm_student(ctx, student, teacher, info, "add", config.guidance_scale, log)
