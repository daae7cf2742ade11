"""Noise schedules: x_t = alpha(t) * x0 + sigma(t) * eps, built from a diffusers scheduler config.

Discrete variance-preserving schedules (DDPM, Ho et al. 2020) keep ``alphas_cumprod`` for integer
timesteps 0..T-1; ``t = -1`` is the clean end of a sampling run (alpha = 1, sigma = 0), which is what
diffusers' DDIM does with ``set_alpha_to_one=True``. Flow-matching schedules (rectified flow, Liu et
al. 2022; Esser et al. 2024) use x_t = (1 - s) x0 + s eps with s = t / T, where t counts time as
diffusers' FlowMatch schedulers do (``timesteps = sigmas * T``): the resolution shift (``shift``, or
the dynamic shift of Flux and SD3.5) is a property of the sampling grid, applied when the grid is
built (``distill.models.base.ModelAdapter.timestep_grid``), not of the process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from accel.core.errors import CheckpointError, RecipeError

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
FLOW_SCHEDULERS = (
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "FlowMatchLCMScheduler",
    "FlowMapEulerDiscreteScheduler",
)


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008."""

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def is_flow(scheduler_config: dict[str, Any]) -> bool:
    """The scheduler config is a flow-matching one (FlowMatch*, or Sana's ``use_flow_sigmas``)."""
    name = scheduler_config.get("_class_name", "")
    return name in FLOW_SCHEDULERS or bool(scheduler_config.get("use_flow_sigmas"))


@dataclass(frozen=True)
class Schedule:
    """alpha(t), sigma(t) of a diffusion process, in float64."""

    kind: Literal["discrete", "flow"]
    num_train_timesteps: int
    alphas_cumprod: torch.Tensor | None = None  # discrete only, shape (T,)
    shift: float = 1.0  # flow only: the static shift of the sampling grid (not of alpha_sigma)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Schedule:
        """Build from a diffusers ``scheduler_config.json`` dict (any DDPM/DDIM/Euler/LCM/FlowMatch)."""
        T = int(config.get("num_train_timesteps", 1000))
        if is_flow(config):
            return cls(kind="flow", num_train_timesteps=T, shift=float(config.get("shift", 1.0)))
        if config.get("rescale_betas_zero_snr"):
            raise CheckpointError(
                "rescale_betas_zero_snr=true (Lin et al. 2024) is not supported yet; its alphas "
                "differ from the plain schedule, so accel would sample the wrong process"
            )
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        else:
            kind = config.get("beta_schedule", "linear")
            start = float(config.get("beta_start", 0.0001))
            end = float(config.get("beta_end", 0.02))
            if kind == "linear":
                betas = torch.linspace(start, end, T, dtype=torch.float64)
            elif kind == "scaled_linear":
                betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
            elif kind == "squaredcos_cap_v2":
                betas = _cosine_betas(T)
            else:
                raise CheckpointError(
                    f"unsupported beta_schedule {kind!r} in scheduler config; "
                    f"use one of {', '.join(BETA_SCHEDULES)}"
                )
        return cls(
            kind="discrete", num_train_timesteps=T, alphas_cumprod=torch.cumprod(1 - betas, 0)
        )

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha(t), sigma(t) as float64 tensors shaped like ``t``; ``t = -1`` is clean data."""
        t = torch.as_tensor(t)
        if self.kind == "flow":
            s = t.to(torch.float64).clamp(min=0) / self.num_train_timesteps
            return 1 - s, s
        assert self.alphas_cumprod is not None
        ac = self.alphas_cumprod.to(t.device)
        a2 = torch.where(t >= 0, ac[t.long().clamp(min=0)], torch.ones((), dtype=torch.float64))
        return a2.sqrt(), (1 - a2).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return alpha**2 / sigma**2

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (_bcast(v, x0) for v in self.alpha_sigma(t))
        return alpha * x0 + sigma * eps

    def ddim_timesteps(self, steps: int) -> list[tuple[int, int]]:
        """(t, t_prev) pairs of a ``steps``-step run, exactly as diffusers' DDIMScheduler with
        ``timestep_spacing="trailing"`` visits them: trailing spacing starts at t = T - 1, which
        few-step samplers need (Lin et al. 2024, "Common diffusion noise schedules and sample
        steps are flawed"), and diffusers steps to t - T // steps."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise RecipeError(
                f"the number of sampling steps must be between 1 and {T}, got {steps}"
            )
        ts = [
            int(round(v)) - 1 for v in torch.arange(T, 0, -T / steps, dtype=torch.float64).tolist()
        ]
        return [(t, t - T // steps) for t in ts]


PROCESS_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
)


def process_config(scheduler_config: dict[str, Any]) -> dict[str, Any]:
    """The keys of a scheduler config that define the noise process and the model's output, to
    carry from a teacher's scheduler into its student's (a different scheduler class)."""
    return {k: scheduler_config[k] for k in PROCESS_KEYS if k in scheduler_config}


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
