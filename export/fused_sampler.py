"""The whole few-step sampler as one graph: noise (and labels) in, images out.

A deployment of an N-step student otherwise makes N engine calls per image, each with host-side
arithmetic between them (``accel.runtime.sample``). ``FusedSampler`` unrolls the sampler plan
instead: every step's timestep, DDIM / consistency coefficients (x_prev = a x + b x0_hat + c z) and
classifier-free guidance (x0_hat = x0_u + w (x0_c - x0_u) over a doubled batch, Ho & Salimans
2022) become constants of one graph. Stochastic (consistency) steps take their fresh noise z from
an input, ``step_noise`` (batch x K x C x H x W for K stochastic steps), so the graph stays
deterministic and reproduces the per-step loop fed the same draws (``accel.runtime.fused_feeds``).
"""

from __future__ import annotations

import torch
from torch import nn

from accel.core.plan import SamplerPlan


def update(plan: SamplerPlan, step, x, x0, guided: bool, step_noise, k: int):
    """One step's update x = a x + b x0_hat (+ c z, the k-th stochastic step's noise), x0_hat
    guided over the doubled batch (conditional half first); returns (x, k)."""
    if guided:  # slices, not chunk(2): chunk's size guard pins the batch
        n = x.shape[0]
        x0 = x0[n:] + plan.guidance_scale * (x0[:n] - x0[n:])
    x = step.a * x + step.b * x0
    if step.c:
        assert step_noise is not None
        x = x + step.c * step_noise[:, k]
        k += 1
    return x, k


class FusedSampler(nn.Module):
    def __init__(self, graph: nn.Module, plan: SamplerPlan) -> None:
        super().__init__()
        self.denoiser = graph  # not `graph`: torch.fx reserves that attribute name
        self.plan = plan
        self.conditional = bool(graph.conditional)
        self.w_input = bool(graph.guidance_input)
        self.guided = self.conditional and plan.guidance_scale != 1.0 and not self.w_input
        self.stochastic = [i for i, s in enumerate(plan.steps) if s.c]

    def input_names(self) -> list[str]:
        names = ["noise"]
        if self.conditional:
            names.append("class_labels")
        if self.stochastic:
            names.append("step_noise")
        return names

    def forward(
        self,
        noise: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        step_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        plan = self.plan
        x = noise * plan.init_noise_sigma
        labels = class_labels if self.conditional else None
        if self.guided:
            assert labels is not None
            labels = torch.cat([labels, torch.full_like(labels, int(plan.null_label))])
        w = None
        if self.w_input:
            w = torch.full_like(noise[:, 0, 0, 0], plan.guidance_scale)
        k = 0
        for step in plan.steps:
            xin = torch.cat([x, x]) if self.guided else x
            t = torch.full_like(xin[:, 0, 0, 0], step.timestep).long()
            x0 = self.denoiser(xin, t, labels, w)
            x, k = update(plan, step, x, x0, self.guided, step_noise, k)
        return x


def example_feeds(
    sampler: FusedSampler, batch: int, seed: int = 0, resolution: int | None = None
) -> dict:
    """numpy feeds for the fused graph: noise (at ``resolution``, default the plan's), labels
    0..K-1 cycled, step noise."""
    import numpy as np

    from accel.runtime import fused_feeds

    rng = np.random.default_rng(seed)
    plan = sampler.plan
    c, h, w = plan.sample_shape
    h, w = (resolution, resolution) if resolution else (h, w)
    noise = rng.standard_normal((batch, c, h, w)).astype(np.float32)
    labels = None
    if sampler.conditional:
        labels = (np.arange(batch) % int(plan.num_classes or 1)).astype(np.int64)
    return fused_feeds(plan, noise, labels, rng)


class FusedPipelineSampler(nn.Module):
    """A latent pipeline's whole few-step loop and its VAE decode as one module, for the torch
    engines (``export.torch_engines``): noise, the prompts' conditioning (the text encoders run
    outside, their embeddings are inputs) and the step noise of stochastic steps in, images out.
    Each step builds the graph's feeds as ``accel.runtime.step_feeds`` does (guidance doubles
    the batch: conditional half, then the null conditioning ``null``, batch 1, broadcast), so it
    reproduces ``accel.runtime.run_pipeline`` fed the same draws."""

    def __init__(
        self,
        graph: nn.Module,
        plan: SamplerPlan,
        null: dict | None = None,
        decode: bool | None = None,
    ) -> None:
        """``decode``: end with the VAE decode (default: where the plan decodes)."""
        super().__init__()
        self.denoiser = graph
        self.decode = plan.decode if decode is None else decode
        self.adapter = graph.adapter
        self.plan = plan
        self.names = list(plan.conditioning)
        self.guided = (
            plan.guidance_scale != 1.0
            and bool(self.names)
            and not plan.guidance_input
            and not plan.guidance_in_model
        )
        if self.guided and null is None:
            raise ValueError("a guided pipeline plan needs the null conditioning")
        self.null_names = []
        for k, v in (null or {}).items():
            if plan.is_batched(k):
                self.register_buffer(f"null_{k}", torch.as_tensor(v), persistent=False)
                self.null_names.append(k)
        self.stochastic = [i for i, s in enumerate(plan.steps) if s.c]
        self.t_dtype = torch.float32 if plan.timestep_dtype == "float32" else torch.int64

    def input_names(self) -> list[str]:
        return ["noise", *self.names, *(["step_noise"] if self.stochastic else [])]

    def forward(self, noise: torch.Tensor, step_noise: torch.Tensor | None = None, **cond):
        plan = self.plan
        x = noise * plan.init_noise_sigma
        n = x.shape[0]
        k = 0
        for step in plan.steps:
            feeds = {"sample": x, "timestep": torch.full((n,), step.timestep, dtype=self.t_dtype,
                                                          device=x.device)}  # fmt: skip
            if step.r_timestep is not None:
                feeds["r_timestep"] = torch.full_like(feeds["timestep"], step.r_timestep)
            if self.guided:
                feeds = {name: torch.cat([v, v]) for name, v in feeds.items()}
                for name, v in cond.items():
                    if name in self.null_names:
                        null = getattr(self, f"null_{name}").to(v.dtype)
                        v = torch.cat([v, null.expand(n, *null.shape[1:])])
                    feeds[name] = v
            else:
                feeds.update(cond)
            if plan.guidance_input:
                feeds["guidance_scale"] = torch.full(
                    (feeds["sample"].shape[0],), plan.guidance_scale, device=x.device
                )
            x, k = update(plan, step, x, self.denoiser(**feeds), self.guided, step_noise, k)
        return self.adapter.decode(x).float() if self.decode else x
