"""Pixel-space ``UNet2DModel`` (DDPM, Ho et al. 2020): unconditional, or class-conditional through
``num_class_embeds`` as accel's digits models are. No text encoder, no VAE: decode is the identity."""

from __future__ import annotations

import torch
from torch import nn

from distill.models.base import ConditioningSpec, ModelAdapter, TensorSpec


class UNet2DAdapter(ModelAdapter):
    family = "unet2d"
    denoiser_folder = "unet"
    pixel = True

    @property
    def conditioning(self) -> str:  # type: ignore[override]
        return "class" if self.num_classes else "none"

    @property
    def num_classes(self) -> int | None:
        return self.config.get("num_class_embeds") or None

    def conditioning_spec(self) -> ConditioningSpec:
        return {"class_labels": TensorSpec(("batch",), "int64")} if self.num_classes else {}

    def encode(self, prompts=None, labels=None, height=None, width=None):
        return {} if labels is None else {"class_labels": torch.as_tensor(labels).long()}

    def null_conditioning(self, height, width):
        return None  # the null class is the checkpoint's (accel.json's null_class_label)

    def forward(self, backbone: nn.Module, x, t, cond):
        return backbone(x, t, class_labels=cond.get("class_labels")).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
