"""Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", stage one).

A classifier-free-guided teacher (Ho & Salimans 2022) runs its backbone twice per step, on the label c
and on the null label. A w-conditioned student x_eta(z_t, c, w) learns the guided output in one pass:

    L = E_{w, t, x ~ D, eps} [ max(SNR_t, 1) || x_eta(z_t, c, w) - x_hat^w(z_t, c) ||^2 ],
    x_hat^w = x_hat(z_t, null) + w (x_hat(z_t, c) - x_hat(z_t, null)),

in x0 space, with t uniform over the training timesteps and w uniform over a grid. (The paper writes
(1 + w) x_c - w x_u, i.e. its w is ours minus one; its weight omega(lambda_t) is taken here as the
truncated SNR weight of Salimans & Ho 2022, which the same authors use for stage two.)

How w enters: the paper adds a Fourier embedding of w to the time embedding. A ``UNet2DModel`` (the
shipped teacher's class) has exactly one side input, the class label, looked up in an embedding
table, and no slot for a continuous value. So the student's table gets one row per (label, w) pair on
a grid of w (``guidance_min`` to ``guidance_max`` in steps of ``guidance_step``), each initialised to
the teacher's row of that label: class id = label + num_labels * j for grid point j. The student stays
a stock ``UNet2DModel``; ``accel.json`` records the grid (``guidance_embedding``), and the exported
graph takes ``guidance_scale`` as an input and maps it to the nearest grid point. Deviation from the
paper: w is discrete (a grid) rather than continuous.

Flow-matching teachers (rectified flow, z_s = (1 - s) x0 + s eps, the backbone's output the
velocity v): the same objective in the flow model's own terms, the velocity regression of flow
matching (Lipman et al. 2023) against the guided teacher,

    L = E_{w, s, x ~ D, eps} || v_eta(z_s, c, w) - v^w(z_s, c) ||^2,
    v^w = v(z_s, null) + w (v(z_s, c) - v(z_s, null)),

s uniform on (0, 1]. In x0 space this is the loss above weighted by 1 / s^2 (x0 = z_s - s v),
which replaces the truncated-SNR weight (it is infinite at s = 0, where every x0 is exact). w
enters Flux through its guidance embedding (FLUX.1-dev's ``guidance_embeds``: a schnell-style
teacher gets the embedding, its last layer zero-initialised so the student starts as the teacher;
the stock ``FluxPipeline`` feeds ``guidance_scale`` to it in one pass). SD3's transformer has no
input the stock pipeline would feed w to, so SD3 teachers are refused: their guidance is baked
into a step-distilled student instead (``progressive``/``consistency`` ``guidance_scale``).

Stage two of the paper (step distillation of the w-conditioned model, w sampled per example) is what
the ``progressive`` and ``consistency`` stages do when their input is this stage's student.

Text-to-image teachers (SD, SDXL; ``distill_w_input``) follow the paper more closely: the student
is the teacher's UNet with a Fourier embedding of w added to its time embedding, which is what
diffusers' ``time_cond_proj_dim`` is (``timestep_cond``, zero-initialised projection, the
pipeline feeding it w - 1), and w is continuous, uniform on [``guidance_min``,
``guidance_max``]. The stock ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` run the
student in one pass per step at any w (they skip classifier-free guidance for such UNets). The
stage-two students of such a teacher learn it at the one w they are given (``guidance_scale``),
not with w sampled per example.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from accel.core.errors import StageError
from accel.core.model_info import GuidanceEmbedding
from accel.core.stage import StageContext, say
from distill.checkpoint import load_teacher
from distill.configs import GuidanceConfig
from distill.data import TrainingData, take, to_device
from distill.denoiser import Denoiser, takes_w
from distill.models import concat_conditioning
from distill.parameterisation import to_x0_eps
from distill.schedule import Schedule, _bcast
from distill.students import euler_kind, save_student
from distill.trainer import Trainer, mean_tail


def w_conditioned_backbone(backbone: nn.Module, grid_size: int) -> nn.Module:
    """A copy of a class-conditional diffusers backbone whose label table has ``grid_size`` copies of
    the teacher's rows (row label + num_labels * j), so it starts as the unguided teacher at every w."""
    cfg = dict(getattr(backbone, "config", {}))
    num_labels = cfg.get("num_class_embeds")
    table = getattr(backbone, "class_embedding", None)
    if (
        not num_labels
        or cfg.get("class_embed_type") is not None
        or not isinstance(table, nn.Embedding)
    ):
        raise StageError(
            "guidance",
            f"{type(backbone).__name__} has no class-label embedding table (num_class_embeds); "
            "guidance distillation needs a class-conditional teacher trained with a null label",
        )
    student = type(backbone).from_config({**cfg, "num_class_embeds": num_labels * grid_size})
    state = copy.deepcopy(backbone.state_dict())
    state["class_embedding.weight"] = state["class_embedding.weight"].repeat(grid_size, 1)
    student.load_state_dict(state)
    return student


def guided_x0(
    teacher: Denoiser, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """The teacher's classifier-free-guided x0 with a per-sample w, in one doubled batch."""
    null = torch.full_like(labels, teacher.null_label)
    out = teacher.backbone(
        torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null])
    ).sample
    cond, uncond = out.chunk(2)
    guided = uncond + _bcast(w, x) * (cond - uncond)
    alpha, sigma = (_bcast(v, x) for v in teacher.schedule.alpha_sigma(t))
    return to_x0_eps(guided, x, alpha, sigma, teacher.prediction_type)[0]


_NO_W_INPUT = (
    "{family} models have no w input that the stock pipeline feeds; bake the guidance into a "
    "step-distilled student instead (progressive or consistency with guidance_scale)"
)


def draw_time(sched: Schedule, rng: Trainer, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t and the per-example weight of the x0-space loss: t uniform over the training timesteps
    with max(SNR, 1) (discrete), or flow time uniform on (0, T] with 1 / s^2 (the velocity loss)."""
    T = sched.num_train_timesteps
    if sched.kind == "flow":
        s = 1 - rng.rand(n, torch.float64)  # (0, 1]
        return s * T, s.pow(-2)
    t = rng.randint(T, n)
    return t, sched.snr(t).clamp(min=1.0)


def distill(
    teacher: Denoiser,
    student_backbone: nn.Module,
    num_labels: int,
    data: tuple[torch.Tensor, torch.Tensor],
    config: GuidanceConfig,
    work: Path | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = say,
) -> tuple[Denoiser, list[dict[str, float]]]:
    """Train the w-conditioned ``student_backbone`` on the guided teacher; returns the student (at
    the config's default w) and the loss log."""
    if teacher.null_label is None:
        raise StageError("guidance", "the teacher has no null label (no unconditional branch)")
    trainer = Trainer("guidance", config, config.iterations, work, resume, progress=progress)
    sched, ptype = teacher.schedule, teacher.prediction_type
    scales = config.scales()
    backbone = copy.deepcopy(student_backbone).requires_grad_(True).train()
    opt = torch.optim.Adam(backbone.parameters(), lr=config.learning_rate)
    backbone, opt = trainer.prepare(backbone, opt)
    trainer.place_teacher(teacher)
    student = Denoiser(backbone, sched, ptype, scales[0], None, scales, num_labels)
    student.labels_carry_guidance = True
    grid = torch.tensor(scales, device=trainer.device)
    x_data, y_data = (d.to(trainer.device) for d in data)

    def step() -> dict[str, torch.Tensor]:
        idx = trainer.randint(len(x_data), config.batch_size)
        x0, y = x_data[idx], y_data[idx]
        j = trainer.randint(len(scales), len(idx))
        t, weight = draw_time(sched, trainer, len(idx))
        z_t = sched.add_noise(x0, trainer.randn(x0.shape, x0.dtype), t)
        with torch.no_grad():
            target = guided_x0(teacher, z_t, t, y, grid[j].to(x0.dtype))
        x_hat = student.predict(z_t, t, y + num_labels * j)[0]
        weight = _bcast(weight, x0)
        loss = (weight * (target - x_hat) ** 2).mean()
        trainer.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    log = trainer.run(step)
    backbone = trainer.unwrap(backbone).eval().requires_grad_(False)
    w = config.guidance_scale
    return Denoiser(backbone, sched, ptype, w, None, scales, num_labels), log


def distill_w_input(
    teacher: Denoiser,
    data: TrainingData,
    config: GuidanceConfig,
    work: Path | None = None,
    resume: bool = False,
    progress: Callable[[str], None] = say,
) -> tuple[Denoiser, list[dict[str, float]]]:
    """Guidance distillation of a family-adapter teacher into a student with the family's w input
    (``with_guidance_input``), w uniform on [guidance_min, guidance_max] per example."""
    adapter = teacher.adapter
    trainer = Trainer("guidance", config, config.iterations, work, resume, progress=progress)
    sched, ptype = teacher.schedule, teacher.prediction_type
    backbone = adapter.with_guidance_input(copy.deepcopy(teacher.backbone))
    if backbone is None:
        raise StageError("guidance", _NO_W_INPUT.format(family=adapter.family))
    backbone = backbone.requires_grad_(True).train()
    opt = torch.optim.Adam(backbone.parameters(), lr=config.learning_rate)
    backbone, opt = trainer.prepare(backbone, opt)
    trainer.place_teacher(teacher)
    student = Denoiser(backbone, sched, ptype, adapter=adapter)  # one pass, w as an input
    spec = adapter.conditioning_spec()
    null = teacher._null()  # encoded before the text encoders were released (stage_data)
    x_data, y_data = to_device(data, trainer.device)
    lo, hi = config.guidance_min, config.guidance_max

    def step() -> dict[str, torch.Tensor]:
        idx = trainer.randint(len(x_data), config.batch_size)
        x0, y = x_data[idx], take(y_data, idx)
        w = lo + (hi - lo) * trainer.rand(len(idx))
        t, weight = draw_time(sched, trainer, len(idx))
        z_t = sched.add_noise(x0, trainer.randn(x0.shape, x0.dtype), t)
        alpha, sigma = (_bcast(v, x0) for v in sched.alpha_sigma(t))
        with torch.no_grad():
            both = concat_conditioning(spec, y, null)
            out = adapter.forward(teacher.backbone, torch.cat([z_t, z_t]), torch.cat([t, t]), both)
            cond, uncond = out.chunk(2)
            guided = uncond + _bcast(w, x0) * (cond - uncond)
            target = to_x0_eps(guided, z_t, alpha, sigma, ptype)[0]
        w_in = {
            k: v.to(x0.device) for k, v in adapter.guidance_inputs(backbone, w, len(idx)).items()
        }
        x_hat = student.predict(z_t, t, {**y, **w_in})[0]
        weight = _bcast(weight, x0)
        loss = (weight * (target - x_hat) ** 2).mean()
        trainer.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {"loss": loss.detach()}

    log = trainer.run(step)
    backbone = trainer.unwrap(backbone).eval().requires_grad_(False)
    return Denoiser(backbone, sched, ptype, adapter=adapter), log


def run(ctx: StageContext) -> None:
    config: GuidanceConfig = ctx.config  # type: ignore[assignment]
    from distill.data import stage_data

    teacher, info = load_teacher(ctx.input.path, "guidance", 1.0, flow=True)
    if info.guidance_embedding is not None or takes_w(teacher.backbone):
        raise StageError(
            "guidance", "the input is already guidance-distilled (it takes w as an input)"
        )
    label_grid = teacher.adapter.null_from_info  # w as label-table rows, not a w input
    if label_grid and teacher.null_label is None:
        raise StageError(
            "guidance",
            f"{ctx.input.path} has no null_class_label in accel.json: guidance distillation "
            "needs a teacher trained for classifier-free guidance",
        )
    # a family without a w input is refused before this runs (the stage requires "w_input")
    data = stage_data(ctx, teacher, config.dataset, config.seed)
    if not label_grid:  # the family's w input (SD, SDXL: LCM's; Flux: guidance)
        student, log = distill_w_input(teacher, data, config, ctx.work, ctx.resume, ctx.progress)
        student_info = info.student(method="guidance", guidance_scale=config.guidance_scale)
    else:  # a class-label UNet2DModel: w on a grid of label-table rows
        scales = config.scales()
        num_labels = int(teacher.backbone.config.num_class_embeds)
        student_backbone = w_conditioned_backbone(teacher.backbone, len(scales))
        student, log = distill(
            teacher, student_backbone, num_labels, data, config, ctx.work, ctx.resume,
            ctx.progress,
        )  # fmt: skip
        student_info = info.student(
            method="guidance",
            guidance_scale=config.guidance_scale,
            guidance_embedding=GuidanceEmbedding(scales, num_labels),
        )
    save_student(
        ctx,
        student.backbone,
        euler_kind(teacher.schedule.kind == "flow").scheduler_config(teacher.scheduler_config),
        student_info,
        teacher,
        log,
        {"final_loss": mean_tail(log)},
    )
