"""The one contract every method, sampler and exported graph speaks: x_t, t, labels -> x0_hat.

``Denoiser`` wraps a diffusers backbone called as ``backbone(x, t, class_labels=y).sample`` and turns
its raw output into (x0, eps) in one place, ``to_x0_eps``, for every prediction type:

    epsilon  (Ho et al. 2020)       x0 = (x - sigma eps) / alpha
    v        (Salimans & Ho 2022)   x0 = alpha x - sigma v,       eps = sigma x + alpha v
    sample                          x0 = output,                  eps = (x - alpha x0) / sigma
    flow     (Liu et al. 2022)      v = eps - x0: x0 = x - sigma v, eps = x + alpha v

Classifier-free guidance (Ho & Salimans 2022) mixes the raw outputs,
out = out_uncond + w (out_cond - out_uncond); every conversion above is affine in the output at fixed
(x, t), so this equals guiding x0 or eps. w = 1 is the plain conditional model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from accel.core.errors import CheckpointError
from accel.core.model_info import ModelInfo
from distill.schedule import Schedule, _bcast

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _unknown_prediction_type(name: str) -> CheckpointError:
    return CheckpointError(
        f"unknown prediction_type {name!r}; use one of {', '.join(PREDICTION_TYPES)}"
    )


def sample_shape(backbone: nn.Module) -> list[int]:
    """[C, H, W] of the backbone's samples, from its diffusers config."""
    cfg = backbone.config
    size = cfg.sample_size
    return [cfg.in_channels, *(size if isinstance(size, (list, tuple)) else (size, size))]


def to_x0_eps(
    output: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a backbone output to (x0, eps); alpha and sigma broadcast against x."""
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * x - sigma * output, sigma * x + alpha * output
    if prediction_type == "sample":
        return output, (x - alpha * output) / sigma
    if prediction_type == "flow":
        return x - sigma * output, x + alpha * output
    raise _unknown_prediction_type(prediction_type)


def from_x0_eps(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The backbone output that ``to_x0_eps`` maps to (x0, eps): the regression target of a student."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        return eps - x0
    raise _unknown_prediction_type(prediction_type)


def guidance_labels(
    labels: torch.Tensor, w: torch.Tensor | float, scales: torch.Tensor, num_labels: int
) -> torch.Tensor:
    """The class ids of a guidance-distilled (w-conditioned) backbone: label + num_labels * j, j the
    grid point of ``scales`` nearest to w (see ``distill.guidance``)."""
    w = torch.as_tensor(w, dtype=scales.dtype, device=labels.device).expand(labels.shape[0])
    j = (scales.to(labels.device)[None, :] - w[:, None]).abs().argmin(1)
    return labels + num_labels * j


class Denoiser(nn.Module):
    """A diffusers backbone as x0/eps predictor over a Schedule, with optional CFG.

    ``guidance_scale`` w and ``null_label`` (the class id used for the unconditional branch) turn on
    classifier-free guidance; the batch is doubled inside one backbone call. A guidance-distilled
    backbone (``guidance_scales``: its grid of w, Meng et al. 2023) takes w as an input instead, in
    one pass; with ``labels_carry_guidance`` the labels given are already such class ids."""

    def __init__(
        self,
        backbone: nn.Module,
        schedule: Schedule,
        prediction_type: str,
        guidance_scale: float = 1.0,
        null_label: int | None = None,
        guidance_scales: list[float] | None = None,
        num_labels: int | None = None,
        adapter: Any = None,
        null_conditioning: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        # A family adapter (distill.models) calls the backbone with a conditioning dict; without
        # one, the backbone is a class-conditional UNet2DModel called with class labels.
        self.adapter = adapter
        self.null_conditioning = null_conditioning  # adapter models: encoded on first use
        self.scheduler_config: dict[str, Any] | None = None  # the pipeline's (load_denoiser)
        # an unconditional UNet2DModel is never fed labels (diffusers refuses them); backbones
        # without a diffusers config (the Gaussian-mixture teachers of the tests) take them as given
        cfg = getattr(backbone, "config", None)
        self.class_conditional = cfg is None or bool(
            cfg.get("num_class_embeds") or cfg.get("class_embed_type")
        )
        if prediction_type not in PREDICTION_TYPES:
            raise _unknown_prediction_type(prediction_type)
        if (
            adapter is None
            and guidance_scale != 1.0
            and null_label is None
            and guidance_scales is None
        ):
            raise ValueError(
                "classifier-free guidance needs the null label of the unconditional branch"
            )
        self.backbone = backbone
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.guidance_scale = float(guidance_scale)
        self.null_label = null_label
        self.guidance_scales = None if guidance_scales is None else list(guidance_scales)
        self.num_labels = num_labels
        self.labels_carry_guidance = False
        if self.guidance_scales is not None:
            if num_labels is None:
                raise ValueError("a w-conditioned backbone needs num_labels")
            if min(abs(w - guidance_scale) for w in self.guidance_scales) > 1e-6:
                raise CheckpointError(
                    f"guidance scale {guidance_scale} is not on this guidance-distilled model's "
                    f"grid {self.guidance_scales}"
                )

    consistency = False  # True for students carrying the consistency boundary condition
    flow_map = False  # True for flow-map students (``distill.meanflow``): their graphs take r

    def student_of(self, backbone: nn.Module, cls: type[Denoiser] | None = None, **kw) -> Denoiser:
        """A Denoiser on ``backbone`` with this one's schedule and prediction type, without CFG (a
        student has guidance baked in) but with the w input if this model has one."""
        student = (cls or Denoiser)(
            backbone,
            self.schedule,
            self.prediction_type,
            guidance_scale=self.guidance_scale if self.guidance_scales else 1.0,
            guidance_scales=self.guidance_scales,
            num_labels=self.num_labels,
            adapter=self.adapter,
            null_conditioning=self.null_conditioning,
            **kw,
        )
        student.labels_carry_guidance = self.labels_carry_guidance
        student.scheduler_config = self.scheduler_config
        return student

    def training_labels(
        self, labels: torch.Tensor, randint: Callable[[int, int], torch.Tensor]
    ) -> torch.Tensor:
        """Labels for step-distilling a w-conditioned model: each paired with a random w of its
        grid (Meng et al. 2023, stage two; set ``labels_carry_guidance``); others unchanged."""
        if self.guidance_scales is None or self.num_labels is None:
            return labels
        return labels + self.num_labels * randint(len(self.guidance_scales), len(labels))

    def raw(self, x: torch.Tensor, t: torch.Tensor, labels: Any) -> torch.Tensor:
        """The backbone's (guided) output, in its own prediction type. ``labels`` is the
        conditioning: a dict of named tensors for adapter models, class labels otherwise."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        if self.adapter is not None:
            return self._raw_conditioned(x, t, labels or {})
        if not self.class_conditional:
            labels = None
        if self.guidance_scales is not None and labels is not None:
            if not self.labels_carry_guidance:
                scales = torch.tensor(self.guidance_scales, dtype=torch.float64)
                labels = guidance_labels(labels, self.guidance_scale, scales, self.num_labels)
            return self.backbone(x, t, class_labels=labels).sample
        if self.guidance_scale == 1.0 or labels is None:
            return self.backbone(x, t, class_labels=labels).sample
        null = torch.full_like(labels, self.null_label)
        out = self.backbone(
            torch.cat([x, x]), torch.cat([t, t]), class_labels=torch.cat([labels, null])
        ).sample
        cond, uncond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def _raw_conditioned(
        self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        from distill.models import concat_conditioning

        if self.guidance_scale == 1.0 or self.adapter.guidance_in_model:
            return self.adapter.forward(self.backbone, x, t, cond)
        if self.null_conditioning is None:
            size = self.adapter.resolution or self.adapter.default_resolution()
            self.null_conditioning = self.adapter.null_conditioning(*size)
        both = concat_conditioning(self.adapter.conditioning_spec(), cond, self.null_conditioning)
        out = self.adapter.forward(self.backbone, torch.cat([x, x]), torch.cat([t, t]), both)
        c, u = out.chunk(2)
        return u + self.guidance_scale * (c - u)

    def predict(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) at timestep(s) t."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        alpha, sigma = (_bcast(v, x) for v in self.schedule.alpha_sigma(t))
        return to_x0_eps(self.raw(x, t, labels), x, alpha, sigma, self.prediction_type)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.predict(x, t, labels)[0]


SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(
    t: torch.Tensor, sigma_data: float = SIGMA_DATA, timestep_scaling: float = TIMESTEP_SCALING
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at integer timesteps t, as LCMScheduler computes them: f(x, 0) = x."""
    s = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2).sqrt()
    return c_skip, c_out


class ConsistencyDenoiser(Denoiser):
    """A Denoiser whose x0 is the consistency function f(x, t) = c_skip x + c_out x0_hat
    (Song et al. 2023, eq. 5), trained on the ``solver_steps`` grid of ``distill.consistency``."""

    consistency = True
    trigflow = False
    """Sampled at sCM's TrigFlow grid (``distill.scm``) instead of its scheduler's."""

    def __init__(self, *args, solver_steps: int = 50, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.solver_steps = solver_steps

    def predict(self, x, t, labels=None):
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        x0_hat = super().predict(x, t, labels)[0]
        c_skip, c_out = (_bcast(v, x) for v in boundary_scalings(t))
        x0 = c_skip * x + c_out * x0_hat
        alpha, sigma = (_bcast(v, x) for v in self.schedule.alpha_sigma(t))
        return x0, (x - alpha * x0) / sigma.clamp(min=1e-12)


class FlowConsistencyDenoiser(Denoiser):
    """A flow-matching consistency student (``distill.consistency``'s flow form): its x0 is the
    consistency function itself, f(x, s) = x - s v(x, s), whose boundary f(x, 0) = x holds by the
    flow parameterisation (it is the x0 ``FlowMatchLCMScheduler.step`` computes), so no
    c_skip/c_out scalings (its ConsistencySpec records sigma_data = timestep_scaling = 0)."""

    consistency = True
    trigflow = False
    """Sampled at sCM's TrigFlow grid (``distill.scm``) instead of its scheduler's."""

    def __init__(self, *args, solver_steps: int = 50, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.solver_steps = solver_steps


def takes_w(backbone: nn.Module) -> bool:
    """The backbone takes w as an input (an LCM-form UNet's ``time_cond_proj_dim``, FLUX.1-dev's
    ``guidance_embeds``)."""
    cfg = getattr(backbone, "config", None)
    return bool(cfg and (cfg.get("time_cond_proj_dim") or cfg.get("guidance_embeds")))


def w_conditioning(
    adapter: Any, backbone: nn.Module | None, w: float, device: torch.device | str
) -> Callable[[Any, int], Any]:
    """``add(cond, n)``: a batch of ``n`` examples' conditioning plus the inputs that carry
    ``w`` into ``backbone`` (LCM's w embedding, FLUX.1-dev's guidance), so that a student with a
    w input learns the teacher guided at w, given w; the conditioning unchanged for backbones
    without one (or no ``backbone``)."""
    inputs = {} if adapter is None or backbone is None else adapter.guidance_inputs(backbone, w, 1)
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def add(cond: Any, n: int) -> Any:
        if not inputs:
            return cond
        return {**cond, **{k: v.expand(n, *v.shape[1:]) for k, v in inputs.items()}}

    return add


def load_denoiser(
    model_dir: str | Path, guidance_scale: float | None = None, load_components: bool = True
) -> tuple[Denoiser, ModelInfo]:
    """Load a diffusers pipeline directory (``model_index.json``, the denoiser's folder,
    ``scheduler/`` and, for latent text-to-image families, the text encoders, tokenizers and VAE)
    as a Denoiser through its family's adapter (``distill.models``), reading weights through
    safetensors only (corrupt files and NaN weights are errors).

    ``accel.json`` beside ``model_index.json`` (``accel.core.model_info.ModelInfo``) may name
    ``null_class_label`` (for guidance), ``num_inference_steps`` and ``guidance_scale`` (a
    student's defaults); it is returned. The scheduler's config is the denoiser's
    ``scheduler_config``."""
    from distill.models import load_pipeline

    root = Path(model_dir)
    adapter = load_pipeline(root, load_components=load_components)
    info = ModelInfo.read(root)
    sched_cfg = adapter.scheduler_config
    w = guidance_scale if guidance_scale is not None else info.guidance_scale
    args = (adapter.backbone, adapter.schedule, adapter.prediction_type)
    kwargs: dict[str, Any]
    if adapter.family != "unet2d":
        default = getattr(adapter, "default_guidance", 1.0) if adapter.guidance_in_model else 1.0
        w = float(default if w is None else w)
        if adapter.guidance_in_model:
            adapter.guidance_scale = w
        kwargs = {"guidance_scale": w, "adapter": adapter}
    else:
        w = 1.0 if w is None else float(w)
        null = info.null_class_label
        embedding = info.guidance_embedding  # a guidance-distilled model: w is an input
        if w != 1.0 and null is None and embedding is None:
            raise CheckpointError(
                f"guidance scale {w} needs an unconditional class; {root} has no accel.json with "
                "null_class_label (students with guidance baked in sample with guidance 1)"
            )
        kwargs = {"guidance_scale": w, "null_label": null}
        if embedding is not None:
            kwargs.update(guidance_scales=embedding.scales, num_labels=embedding.num_labels)
    if info.method == "meanflow":
        from distill.students import FlowMapDenoiser, load_interval

        load_interval(adapter.backbone, root / adapter.denoiser_folder)
        denoiser: Denoiser = FlowMapDenoiser(*args, **kwargs)
        denoiser.flow_map_shift = float(sched_cfg.get("shift", 1.0))  # type: ignore[attr-defined]
    elif info.consistency is not None and adapter.schedule.kind == "flow":
        denoiser = FlowConsistencyDenoiser(
            *args, solver_steps=info.consistency.solver_steps, **kwargs
        )
        denoiser.trigflow = info.consistency.grid == "trigflow"  # type: ignore[attr-defined]
    elif info.consistency is not None:
        if float(sched_cfg.get("timestep_scaling", TIMESTEP_SCALING)) != TIMESTEP_SCALING:
            raise CheckpointError(
                f"{root}: timestep_scaling other than {TIMESTEP_SCALING} is not "
                "supported for consistency students"
            )
        denoiser = ConsistencyDenoiser(*args, solver_steps=info.consistency.solver_steps, **kwargs)
    else:
        denoiser = Denoiser(*args, **kwargs)
    denoiser.scheduler_config = sched_cfg
    return denoiser, info


def load_teacher(
    path: str | Path,
    stage: str,
    guidance_scale: float,
    students: tuple[str, ...] = (),
    flow: bool = False,
) -> tuple[Denoiser, ModelInfo]:
    """A teacher for a step-distillation stage: a discrete-time model (or a flow-matching one where
    the stage has its flow form, ``flow``) that is not itself a distilled student (distillation
    needs the teacher's own ODE), unless it is a student of one of the ``students`` methods (a
    progressive student is a deterministic DDIM sampler of the ODE)."""
    from accel.core.errors import StageError

    teacher, info = load_denoiser(path, guidance_scale=guidance_scale)
    if teacher.schedule.kind != "discrete" and not flow:
        raise StageError(
            stage,
            f"flow-matching teachers are not supported by {stage} yet (its students step a "
            "discrete VP schedule); progressive distillation takes them",
        )
    if info.is_student and info.method not in students:
        raise StageError(
            stage,
            f"the input is already a distilled {info.method or ''} student; distil from "
            "the teacher, which holds the ODE the student learns",
        )
    return teacher, info


def guidance_info(
    teacher_info: ModelInfo, guidance_scale: float, w_input: bool = False
) -> dict[str, Any]:
    """accel.json guidance fields of a step-distilled student: guidance baked in at
    ``guidance_scale`` (sample with 1), or, from a guidance-distilled teacher (or one whose
    backbone takes w, ``w_input``: FLUX.1-dev), the same w input."""
    if w_input:
        return {"guidance_scale": guidance_scale}
    embedding = teacher_info.guidance_embedding
    if embedding is None:
        if guidance_scale == 1.0:  # a student of a student: the guidance its teacher baked in
            guidance_scale = teacher_info.distilled_guidance_scale or 1.0
        return {"guidance_scale": 1.0, "distilled_guidance_scale": guidance_scale}
    return {"guidance_scale": guidance_scale, "guidance_embedding": embedding}


def save_pipeline(
    out_dir: str | Path,
    backbone: nn.Module,
    scheduler_config: dict[str, Any],
    info: ModelInfo,
    teacher: Denoiser | None = None,
) -> None:
    """Write a diffusers pipeline directory that stock diffusers loads: model_index.json, the
    backbone (safetensors), the scheduler named in scheduler_config["_class_name"], and accel.json.

    A student of a family pipeline (``teacher`` with an adapter: SD, SDXL) is the whole pipeline:
    the teacher's model_index.json with the new scheduler class, and its other components (text
    encoders, tokenizers, VAE) hard-linked from the teacher's directory (store artifacts are never
    modified, so the bytes are stored once; copied where links are impossible)."""
    import diffusers

    out = Path(out_dir)
    adapter = getattr(teacher, "adapter", None)
    folder = adapter.denoiser_folder if adapter is not None else "unet"
    backbone.save_pretrained(out / folder, safe_serialization=True)
    sched_cls = getattr(diffusers, scheduler_config["_class_name"])
    sched_cls.from_config(scheduler_config).save_pretrained(out / "scheduler")
    if adapter is not None:
        index = dict(adapter.index, scheduler=["diffusers", scheduler_config["_class_name"]])
        if adapter.family == "sd" and scheduler_config["_class_name"] == "LCMScheduler":
            index["_class_name"] = "LatentConsistencyModelPipeline"  # as LCM checkpoints ship
        for name, entry in adapter.index.items():
            if name in (folder, "scheduler") or not isinstance(entry, list) or entry[0] is None:
                continue
            if (adapter.root / name).is_dir():
                _link_tree(adapter.root / name, out / name)
    else:
        # DDPMPipeline makes DiffusionPipeline.from_pretrained load the components; its __call__
        # knows no class labels, so the contract is the unet/ and scheduler/ pair in a plain loop.
        index = {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", scheduler_config["_class_name"]],
            "unet": ["diffusers", type(backbone).__name__],
        }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info.write(out)


def _link_tree(src: Path, dst: Path) -> None:
    import os
    import shutil

    for file in sorted(src.rglob("*")):
        target = dst / file.relative_to(src)
        if file.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)


class DenoiserGraph(nn.Module):
    """The denoiser as a deployable graph: (sample, timestep[, class_labels]) -> x0, float32.

    alpha(t), sigma(t) are float32 lookup tables inside the graph, so every runtime receives the
    same x0 contract whatever the backbone's prediction type; guidance and the sampler's step
    arithmetic stay outside (see the sampler plan)."""

    def __init__(
        self,
        backbone: nn.Module,
        schedule: Schedule,
        prediction_type: str,
        consistency: bool = False,
        guidance_scales: list[float] | None = None,
        num_labels: int | None = None,
        adapter: Any = None,
        flow_map: bool = False,
    ) -> None:
        super().__init__()
        if schedule.kind != "discrete" and adapter is None:
            raise CheckpointError("only discrete-time (DDPM-family) schedules export so far")
        self.backbone = backbone
        self.prediction_type = prediction_type
        self.adapter = adapter
        self.flow = schedule.kind == "flow"
        self.num_train_timesteps = schedule.num_train_timesteps
        t = torch.arange(schedule.num_train_timesteps)
        alpha, sigma = schedule.alpha_sigma(t)
        tables = {} if self.flow else {"alpha": alpha, "sigma": sigma}
        if consistency:  # f = c_skip x + c_out x0_hat: the boundary condition lives in the graph
            tables["c_skip"], tables["c_out"] = boundary_scalings(t)
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)
        self.consistency = consistency
        self.flow_map = flow_map  # a flow-map student: r_timestep is an input
        cfg = getattr(backbone, "config", {})
        self.conditional = bool(cfg.get("num_class_embeds") or cfg.get("class_embed_type"))
        if adapter is not None:
            self.conditional = bool(adapter.conditioning_spec())
        # a guidance-distilled backbone: w is a graph input, mapped to its class ids in the graph
        self.guidance_input = guidance_scales is not None
        if self.guidance_input:
            self.register_buffer(
                "scales", torch.tensor(guidance_scales, dtype=torch.float32), persistent=False
            )
            self.num_labels = int(num_labels or 0)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        guidance_scale: torch.Tensor | None = None,
        r_timestep: torch.Tensor | None = None,
        **conditioning: torch.Tensor,
    ) -> torch.Tensor:
        """x0 from the sample at ``timestep`` (integer DDPM timesteps; float sigma * T for flow
        models) and the conditioning inputs of the family's spec. A flow-map student's x0 is
        sample - sigma_t u(sample, r, t), u its average velocity to ``r_timestep``."""
        if self.flow_map:
            from distill.students import interval

            if r_timestep is None:
                raise ValueError("a flow-map graph needs r_timestep")
            with interval(self.backbone, timestep - r_timestep):
                return self._x0(sample, timestep, class_labels, guidance_scale, conditioning)
        return self._x0(sample, timestep, class_labels, guidance_scale, conditioning)

    def _x0(self, sample, timestep, class_labels, guidance_scale, conditioning) -> torch.Tensor:
        if self.adapter is not None:
            if class_labels is not None:
                conditioning["class_labels"] = class_labels
            out = self.adapter.forward(self.backbone, sample, timestep, conditioning)
        else:
            if self.guidance_input and class_labels is not None and guidance_scale is not None:
                class_labels = guidance_labels(
                    class_labels, guidance_scale, self.scales, self.num_labels
                )
            out = self.backbone(sample, timestep, class_labels=class_labels).sample
        shape = (-1, *([1] * (sample.dim() - 1)))
        if self.flow:
            sigma = (timestep.float() / self.num_train_timesteps).reshape(shape)
            return to_x0_eps(out, sample, 1 - sigma, sigma, self.prediction_type)[0]

        def at(table: torch.Tensor) -> torch.Tensor:
            return table[timestep].reshape(shape)

        x0 = to_x0_eps(out, sample, at(self.alpha), at(self.sigma), self.prediction_type)[0]
        if not self.consistency:
            return x0
        return at(self.c_skip) * sample + at(self.c_out) * x0

    @classmethod
    def of(cls, denoiser: Denoiser) -> DenoiserGraph:
        return cls(
            denoiser.backbone,
            denoiser.schedule,
            denoiser.prediction_type,
            consistency=denoiser.consistency,
            guidance_scales=denoiser.guidance_scales,
            num_labels=denoiser.num_labels,
            adapter=denoiser.adapter,
            flow_map=denoiser.flow_map,
        )
