"""Distribution matching distillation with a GAN term: DMD2 (Yin et al. 2024, "Improved
Distribution Matching Distillation for Fast Image Synthesis"; DMD: Yin et al. 2023).

Three networks, all initialised from the teacher (or, for a fine-tune, the generator from a
distilled student):

- the generator G (the student) maps noise to images in ``student_steps`` steps;
- the real score is the frozen teacher, classifier-free guided at ``guidance_scale``;
- the fake score (the critic) mu_fake is trained to denoise G's samples, so it tracks the score of
  the student's distribution; a small discriminator head D on its bottleneck features
  (``feature_module``) classifies noisy real images against noisy generated ones.

For a generated x = G(z) and x_t = alpha_t x + sigma_t eps, t ~ U[0.02 T, 0.98 T], the generator
minimises the reverse KL through its distribution-matching gradient (DMD eq. 7-8)

    grad_x = (mu_fake(x_t, t) - mu_real(x_t, t)) / mean|x - mu_real(x_t, t)|,
    L_DMD = 1/2 || x - stopgrad(x - grad_x) ||^2

plus ``gan_weight_generator`` * softplus(-D(x_t)) (the non-saturating GAN loss). The critic
minimises the denoising loss of its own prediction type on G's samples plus
``gan_weight_critic`` * [softplus(-D(real_t)) + softplus(D(x_t))], and takes
``critic_updates_per_generator`` updates per generator update (DMD2's two time-scale rule, 5 in the
paper), which replaces DMD's regression loss. ``gan_weight_generator = 0`` and
``gan_weight_critic = 0`` give DMD2 without its GAN term.

Multi-step students (DMD2 sec. 4.5) denoise at the fixed timesteps t_0 = T - 1 > t_1 > ... (the
LCMScheduler grid of ``student_steps``, e.g. 999, 749, 499, 249) and re-noise with fresh noise in
between. With ``backward_simulation`` the generator's training inputs at t_k are made by running the
current generator itself k steps from pure noise, as at inference; without it they are noised real
images (the train/inference mismatch the paper removes). The student is written as an
LCMScheduler checkpoint, whose loop is exactly this sampler (its boundary scalings are 1 and 0 to
within 1e-7 at these timesteps).

Both players use AdamW with PyTorch's default betas and weight decay, as DMD2's official code
does. Deviations: one backward-simulation depth k is drawn per batch rather than per sample; the
critic's denoising loss is the teacher's own training loss (its prediction type) on G's samples;
no gradient-norm clipping and no learning-rate warm-up. The critic's denoising loss and its GAN
logits on real images come from one forward pass (one pass per backward, as DDP needs); the
generator's GAN term goes through the unwrapped critic. ADD (Sauer et al. 2023) is the other
adversarial method, in ``distill/add.py`` (``accel distill adversarial --method add``).

Flow-matching teachers (SD3, Flux; z_s = (1 - s) x0 + s eps, the backbone's output the velocity
v = eps - x0): x0 = z_s - s v and, for the real and fake scores, mu(z_s, s) = z_s - s v(z_s, s),
so the gradient above is unchanged in x0 space (the score of the noised distribution is
-(z_s - (1 - s) mu) / s^2 for either network, and their difference is proportional to
mu_fake - mu_real, which DMD's normalised direction keeps). s is drawn uniform on
[``min_timestep``, ``max_timestep``] (flow time, unshifted); the generator starts at s = 1 and a
multi-step student steps the stock ``FlowMatchLCMScheduler`` grid (the teacher's shift
included), re-noising z = (1 - s') x0 + s' eps in between; the critic regresses the velocity
eps - x0, the flow teacher's own training loss. The student is a ``FlowMatchLCMScheduler``
checkpoint whose x0 is z - s v. The discriminator reads the middle transformer block's
image-token MLP (``ModelAdapter.feature_module``), averaged over tokens.

Text-to-image teachers (SD, SDXL): the generator is given LCM's w input (``time_cond_proj_dim``,
zero-initialised, fed ``guidance_scale``) so that the stock ``LatentConsistencyModelPipeline`` (SD)
or ``StableDiffusionXLPipeline`` with ``LCMScheduler`` (SDXL) runs the student, as DMD2's released
SDXL students run in diffusers with ``LCMScheduler``; the critic taps the UNet's ``mid_block``.
The "real" images of the GAN term are ``imagefolder:`` latents, or, data-free (``prompts:``), the
teacher's own samples, which the DMD term does not need at all (it is driven by the real and fake
scores at the generator's own samples) and the GAN term then pulls toward the teacher's
distribution rather than the data's.

With ``lora_rank`` the three networks are one frozen base (``distill.lora``), as DMD2's SDXL LoRA
student is trained on one UNet: the real score is the base with its adapters off, the generator
one adapter and the fake score a second (initialised, like the generator, at the teacher); the
discriminator head stays a separate float32 module. The guidance is baked in (no w input), and
the student is the teacher's pipeline plus ``pytorch_lora_weights.safetensors``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from accel.core.errors import StageError
from accel.core.stage import StageContext, say
from distill.configs import AdversarialConfig
from distill.data import Conditioning, concat, take, to_device
from distill.denoiser import ConsistencyDenoiser, Denoiser, w_conditioning
from distill.gan import (
    Discriminator,
    FeatureTap,
    dmd_gradient,
    feature_module,
    find_teacher,
    generator_with_w,
)
from distill.lora import lora_networks, teacher_dtype
from distill.parameterisation import from_x0_eps
from distill.samplers import consistency_timesteps, flow_grid
from distill.schedule import _bcast
from distill.students import lcm_kind, save_lcm_student
from distill.trainer import Trainer


def distill(
    teacher: Denoiser,
    generator_init: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    config: AdversarialConfig,
    work: Path | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = say,
) -> tuple[ConsistencyDenoiser, list[dict[str, float]]]:
    """Train a ``student_steps``-step DMD2 student; returns it and the loss log."""
    trainer = Trainer("adversarial", config, config.iterations, work, resume, progress=progress)
    sched, ptype = teacher.schedule, teacher.prediction_type
    T, N = sched.num_train_timesteps, config.student_steps
    flow = sched.kind == "flow"
    student_kind = lcm_kind(flow).wrapper
    x_data, y_data = to_device(data, trainer.device)
    trainer.place_teacher(teacher)
    adapter = teacher.adapter

    def make(net: nn.Module, cls: type[Denoiser] = Denoiser, **kw) -> Denoiser:
        return cls(net, sched, ptype, adapter=adapter, **kw)

    if config.lora_rank:  # one frozen base: the real score, the generator and the fake score
        if generator_init is not teacher.backbone:
            raise StageError(
                "adversarial",
                "a LoRA student (lora_rank) is adapters on the teacher itself, its three networks "
                "one base: it cannot fine-tune another student; drop lora_rank or the student",
            )
        g_net, f_net, g_params, f_params = lora_networks(teacher, config, trainer, ("critic",))
        with_w = w_conditioning(adapter, g_net, config.guidance_scale, trainer.device)
    else:
        g_net, with_w = generator_with_w(
            adapter, generator_init, config.guidance_scale, trainer.device
        )
        f_net = copy.deepcopy(teacher.backbone).requires_grad_(True).train()
        g_params, f_params = g_net, f_net

    def conditioning(idx: torch.Tensor):
        return with_w(take(y_data, idx), len(idx))

    tap = FeatureTap(f_net, config.feature_module or feature_module(f_net))
    with torch.no_grad():
        probe = torch.arange(2, device=trainer.device)
        make(f_net).raw(x_data[:2], torch.full((2,), float(T - 1)), take(y_data, probe))
    assert tap.value is not None
    disc = Discriminator(tap.value.shape).to(x_data.dtype)
    betas = config.adam_betas
    decay = config.weight_decay
    opt_g = torch.optim.AdamW(
        g_params.parameters(), lr=config.learning_rate, betas=betas, weight_decay=decay
    )
    opt_c = torch.optim.AdamW(
        [*f_params.parameters(), *disc.parameters()],
        lr=config.critic_learning_rate or config.learning_rate,
        betas=betas,
        weight_decay=decay,
    )
    if config.lora_rank:
        _, disc, opt_g, opt_c = trainer.prepare(g_net.base, disc, opt_g, opt_c)
    else:
        g_net, f_net, disc, opt_g, opt_c = trainer.prepare(g_net, f_net, disc, opt_g, opt_c)
    generator = make(g_net, student_kind, solver_steps=N)
    fake = make(f_net)
    # the student's own sampling grid: LCMScheduler's, or FlowMatchLCMScheduler's (flow time)
    timesteps = flow_grid(teacher, N)[:-1] if flow else consistency_timesteps(T, N, N)
    t_lo, t_hi = config.min_timestep * T, config.max_timestep * T
    use_gan = config.gan_weight_critic > 0 or config.gan_weight_generator > 0
    state: dict[str, float] = {}

    def draw_t(n: int) -> torch.Tensor:
        if flow:  # continuous flow time
            return t_lo + (t_hi - t_lo) * trainer.rand(n, torch.float64)
        return int(t_lo) + trainer.randint(int(t_hi) - int(t_lo), n)

    def generator_inputs(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x at t_k for a random depth k: k steps of the current generator from pure noise
        (backward simulation), or noised real images."""
        y = conditioning(idx)
        k = trainer.same_on_every_process(int(trainer.randint(N, 1).item()))
        shape = x_data[idx].shape
        if not config.backward_simulation and k > 0:
            t = torch.full((len(idx),), timesteps[k], device=trainer.device)
            return sched.add_noise(x_data[idx], trainer.randn(shape, x_data.dtype), t), t
        x = trainer.randn(shape, x_data.dtype)
        with torch.no_grad():
            for i in range(k):
                x0 = generator.predict(x, torch.tensor(timesteps[i]), y)[0]
                t_next = torch.full((len(idx),), timesteps[i + 1], device=trainer.device)
                x = sched.add_noise(x0, trainer.randn(shape, x_data.dtype), t_next)
        return x, torch.full((len(idx),), timesteps[k], device=trainer.device)

    # The generator's GAN term goes through the critic unwrapped (no DDP): it reads only the
    # bottleneck, and the critic's gradients from it are dropped, not averaged over processes.
    fake_local = make(trainer.accelerator.unwrap_model(f_net))
    disc_local = trainer.accelerator.unwrap_model(disc)

    def logits(x0: torch.Tensor, y: Conditioning, t: torch.Tensor) -> torch.Tensor:
        fake_local.raw(sched.add_noise(x0, trainer.randn(x0.shape, x0.dtype), t), t, y)
        return disc_local(tap.value)

    def step() -> dict[str, torch.Tensor | float]:
        idx = trainer.randint(len(x_data), config.batch_size)
        y = conditioning(idx)
        x_in, t_in = generator_inputs(idx)
        if trainer.step % config.critic_updates_per_generator == 0:  # the generator's turn
            x = generator.predict(x_in, t_in, y)[0]
            t = draw_t(len(x))
            x_t = sched.add_noise(x, trainer.randn(x.shape, x.dtype), t)
            with torch.no_grad():
                grad = dmd_gradient(x, teacher.predict(x_t, t, y)[0], fake.predict(x_t, t, y)[0])
            loss_dmd = 0.5 * F.mse_loss(x, (x - grad).detach())
            loss_g = loss_dmd
            # the GAN term's backward enters the critic at the tap, inside a block, not through
            # the block's output: a sharded critic keeps its blocks gathered until it is done
            with trainer.gathered(f_net if config.gan_weight_generator > 0 else None):
                if config.gan_weight_generator > 0:
                    gan_g = F.softplus(-logits(x, y, draw_t(len(x)))).mean()
                    loss_g = loss_g + config.gan_weight_generator * gan_g
                    state["gan_generator"] = float(gan_g.detach())
                trainer.backward(loss_g)
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            opt_c.zero_grad(set_to_none=True)  # the GAN term reached the critic: not its update
            state["dmd"] = float(loss_dmd.detach())
            x = x.detach()
        else:
            with torch.no_grad():
                x = generator.predict(x_in, t_in, y)[0]
        # the critic: denoise the generator's samples (+ tell noisy real from noisy generated).
        # Noisy real images join the same forward pass: one pass per backward, as DDP needs.
        n = len(x)
        t = draw_t(n)
        eps = trainer.randn(x.shape, x.dtype)
        x_t = sched.add_noise(x, eps, t)
        alpha, sigma = (_bcast(v, x) for v in sched.alpha_sigma(t))
        critic_gan = use_gan and config.gan_weight_critic > 0
        if critic_gan:
            real = trainer.randint(len(x_data), config.batch_size)
            t_real = draw_t(len(real))
            real_t = sched.add_noise(
                x_data[real], trainer.randn(x_data[real].shape, x.dtype), t_real
            )
            x_t, t, y = (
                torch.cat([x_t, real_t]),
                torch.cat([t, t_real]),
                concat(y, conditioning(real)),
            )
        out = fake.raw(x_t, t, y)[:n]
        loss_fake = F.mse_loss(out, from_x0_eps(x, eps, alpha, sigma, ptype))
        loss_c = loss_fake
        if critic_gan:
            d = disc(tap.value)
            gan_c = (F.softplus(-d[n:]) + F.softplus(d[:n])).mean()
            loss_c = loss_c + config.gan_weight_critic * gan_c
            state["gan_critic"] = float(gan_c.detach())
        trainer.backward(loss_c)
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)
        return {"fake": loss_fake.detach(), **state}

    log = trainer.run(step)
    g_net = trainer.unwrap(g_net).eval().requires_grad_(False)
    return make(g_net, student_kind, solver_steps=N), log  # type: ignore[return-value]


def run(ctx: StageContext) -> None:
    config: AdversarialConfig = ctx.config  # type: ignore[assignment]
    from distill.data import stage_data

    teacher, init, info = find_teacher(ctx, config.guidance_scale, dtype=teacher_dtype(config))
    data = stage_data(ctx, teacher, config.dataset, config.seed)
    student, log = distill(teacher, init, data, config, ctx.work, ctx.resume, ctx.progress)
    save_lcm_student(ctx, student, teacher, info, "dmd2", config.guidance_scale, log)
