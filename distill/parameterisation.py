"""Prediction types in one place: a backbone's raw output as (x0, eps) and back, for every
parameterisation (``to_x0_eps``, ``from_x0_eps``):

    epsilon  (Ho et al. 2020)       x0 = (x - sigma eps) / alpha
    v        (Salimans & Ho 2022)   x0 = alpha x - sigma v,       eps = sigma x + alpha v
    sample                          x0 = output,                  eps = (x - alpha x0) / sigma
    flow     (Liu et al. 2022)      v = eps - x0: x0 = x - sigma v, eps = x + alpha v

and the consistency models' boundary condition (Song et al. 2023; LCM's c_skip/c_out)."""

from __future__ import annotations

from typing import Literal

import torch

from accel.core.errors import CheckpointError

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def _unknown_prediction_type(name: str) -> CheckpointError:
    return CheckpointError(
        f"unknown prediction_type {name!r}; use one of {', '.join(PREDICTION_TYPES)}"
    )


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
