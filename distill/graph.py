"""The exported and eager graph of a denoiser: ``DenoiserGraph``, (sample, timestep,
**conditioning) -> x0 with guidance and the student's parameterisation inside, which every
exporter traces and every torch runtime runs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from accel.core.errors import CheckpointError
from distill.denoiser import Denoiser, guidance_labels
from distill.parameterisation import boundary_scalings, to_x0_eps
from distill.schedule import Schedule


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
        if adapter is None:
            from distill.models.unet2d import UNet2DAdapter

            adapter = UNet2DAdapter.bare(backbone)
        if schedule.kind != "discrete" and adapter.pixel:
            raise CheckpointError(
                "a pixel-space model exports on a discrete-time (DDPM-family) schedule only"
            )
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
        if self.guidance_input and class_labels is not None and guidance_scale is not None:
            # a guidance-distilled pixel UNet: w picks the row of its label table
            class_labels = guidance_labels(
                class_labels, guidance_scale, self.scales, self.num_labels
            )
        if class_labels is not None:
            conditioning["class_labels"] = class_labels
        out = self.adapter.forward(self.backbone, sample, timestep, conditioning)
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
