"""DiT (Peebles & Xie 2023): ``DiTTransformer2DModel``, a class-conditional latent transformer with
adaLN-zero, a learned-variance output (the second half of the channels, split off here) and DDPM
timesteps, decoded by ``AutoencoderKL``. The null class of classifier-free guidance is the extra
row of the label table, id ``num_embeds_ada_norm`` (1000 for ImageNet DiTs), as ``DiTPipeline``
uses it."""

from __future__ import annotations

import torch
from torch import nn

from accel.core.errors import CheckpointError
from distill.models.base import ConditioningSpec, ModelAdapter, TensorSpec


class DiTAdapter(ModelAdapter):
    family = "dit"
    fused_sampler = False  # untested
    components = ("vae",)
    conditioning = "class"

    @property
    def num_classes(self) -> int:
        return int(self.config.num_embeds_ada_norm)

    def conditioning_spec(self) -> ConditioningSpec:
        return {"class_labels": TensorSpec(("batch",), "int64")}

    def encode(self, prompts=None, labels=None, height=None, width=None):
        if prompts is not None:
            raise CheckpointError("DiT models are class-conditional: give --label, not --prompt")
        if labels is None:
            raise CheckpointError("DiT models are class-conditional: give --label")
        return {"class_labels": torch.as_tensor(labels).long()}

    def null_conditioning(self, height, width):
        return {"class_labels": torch.tensor([self.num_classes])}

    def forward(self, backbone: nn.Module, x, t, cond):
        out = backbone(x, timestep=t, class_labels=cond["class_labels"]).sample
        if self.config.out_channels // 2 == self.config.in_channels:  # learned variance
            out = out[:, : self.config.in_channels]
        return out

    def decode(self, latents):
        vae = self.modules["vae"]
        return vae.decode(1 / vae.config.scaling_factor * latents).sample.float()
