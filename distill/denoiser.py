"""The one contract every method, sampler and exported graph speaks: x_t, t, labels -> x0_hat.

``Denoiser`` wraps a diffusers backbone called as ``backbone(x, t, class_labels=y).sample`` and turns
its raw output into (x0, eps) in one place, ``distill.parameterisation.to_x0_eps``, for every
prediction type; the consistency students carry their boundary condition inside.

Classifier-free guidance (Ho & Salimans 2022) mixes the raw outputs,
out = out_uncond + w (out_cond - out_uncond); every conversion is affine in the output at fixed
(x, t), so this equals guiding x0 or eps. w = 1 is the plain conditional model.

Beside it: ``distill.checkpoint`` (loading a denoiser from a pipeline directory, writing a
student's) and ``distill.graph`` (``DenoiserGraph``, the exported and eager graph).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from accel.core.errors import CheckpointError
from distill.parameterisation import (
    PREDICTION_TYPES,
    _unknown_prediction_type,
    boundary_scalings,
    to_x0_eps,
)
from distill.schedule import Schedule, _bcast


def sample_shape(backbone: nn.Module) -> list[int]:
    """[C, H, W] of the backbone's samples, from its diffusers config."""
    cfg = backbone.config
    size = cfg.sample_size
    return [cfg.in_channels, *(size if isinstance(size, (list, tuple)) else (size, size))]


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
        # Every backbone is called through its family's adapter with a conditioning dict; a bare
        # one (built in memory, no pipeline directory) is a pixel UNet2DModel's.
        if adapter is None:
            from distill.models.unet2d import UNet2DAdapter

            adapter = UNet2DAdapter.bare(backbone)
        self.adapter = adapter
        self.null_conditioning = null_conditioning  # encoded on first use (_null)
        self.scheduler_config: dict[str, Any] | None = None  # the pipeline's (load_denoiser)
        if prediction_type not in PREDICTION_TYPES:
            raise _unknown_prediction_type(prediction_type)
        if (
            adapter.null_from_info
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

    @property
    def class_conditional(self) -> bool:
        """It is conditioned on class labels (a class-conditional pixel UNet, DiT)."""
        return self.adapter.conditioning == "class"

    def raw(self, x: torch.Tensor, t: torch.Tensor, labels: Any) -> torch.Tensor:
        """The backbone's (guided) output, in its own prediction type. ``labels`` is the
        conditioning: a dict of named tensors (``ModelAdapter.encode``), or a pixel UNet's class
        labels."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        cond = self.adapter.as_conditioning(labels)
        if self.guidance_scales is not None and "class_labels" in cond:
            # a guidance-distilled pixel UNet: w is a row of its label table, one pass
            if not self.labels_carry_guidance:
                scales = torch.tensor(self.guidance_scales, dtype=torch.float64)
                w_labels = guidance_labels(
                    cond["class_labels"], self.guidance_scale, scales, self.num_labels
                )
                cond = {**cond, "class_labels": w_labels}
            return self.adapter.forward(self.backbone, x, t, cond)
        if self.guidance_scale == 1.0 or self.adapter.guidance_in_model or not cond:
            return self.adapter.forward(self.backbone, x, t, cond)
        from distill.models import concat_conditioning

        both = concat_conditioning(self.adapter.conditioning_spec(), cond, self._null())
        out = self.adapter.forward(self.backbone, torch.cat([x, x]), torch.cat([t, t]), both)
        c, u = out.chunk(2)
        return u + self.guidance_scale * (c - u)

    def _null(self) -> dict[str, torch.Tensor]:
        """The conditioning of guidance's unconditional branch, batch 1: the checkpoint's null
        class (pixel UNets) or the adapter's (the empty prompt's, DiT's extra class)."""
        if self.null_conditioning is None:
            if self.adapter.null_from_info:
                if self.null_label is None:
                    raise ValueError(
                        "classifier-free guidance needs the null label of the unconditional branch"
                    )
                null = torch.tensor([int(self.null_label)])
                self.null_conditioning = self.adapter.as_conditioning(null)
            else:
                size = self.adapter.resolution or self.adapter.default_resolution()
                self.null_conditioning = self.adapter.null_conditioning(*size)
        return self.null_conditioning

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
    inputs = {} if backbone is None else adapter.guidance_inputs(backbone, w, 1)
    inputs = {k: v.to(device) for k, v in inputs.items()}

    def add(cond: Any, n: int) -> Any:
        if not inputs:
            return cond
        return {**cond, **{k: v.expand(n, *v.shape[1:]) for k, v in inputs.items()}}

    return add
