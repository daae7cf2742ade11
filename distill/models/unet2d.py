"""Pixel-space ``UNet2DModel`` (DDPM, Ho et al. 2020): unconditional, or class-conditional through
``num_class_embeds`` as accel's digits models are. No text encoder, no VAE: decode is the identity.

Its conditioning is class labels, given as a tensor (``as_conditioning``) or as
``{"class_labels": ...}``. The unconditional branch of classifier-free guidance is the checkpoint's
null class (``accel.json``'s ``null_class_label``, ``null_from_info``), and a guidance-distilled
model carries w in its labels (a grid of label-table rows, ``distill.guidance``). A bare backbone
(``bare``: the digits UNets built in memory, the Gaussian-mixture teachers of the tests, which have
no diffusers config and take the labels as given) goes through the same adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.models.base import ConditioningSpec, ModelAdapter, TensorSpec


class UNet2DAdapter(ModelAdapter):
    family = "unet2d"
    denoiser_folder = "unet"
    pixel = True
    null_from_info = True
    lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut",
        "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
    )  # fmt: skip
    """The UNet's attention and ResNet layers, as LCM-LoRA adapts a latent UNet's."""

    @classmethod
    def bare(cls, backbone: nn.Module, scheduler_config: dict[str, Any] | None = None):
        """The adapter of a backbone that has no pipeline directory (built in memory)."""
        adapter = cls.__new__(cls)
        adapter.root = Path()
        adapter.backbone = backbone
        adapter.config = getattr(backbone, "config", None)
        adapter.scheduler_config = scheduler_config or {}
        adapter.index = {}
        adapter.modules = {}
        return adapter

    @property
    def conditioning(self) -> str:  # type: ignore[override]
        return "class" if self.class_conditional else "none"

    @property
    def class_conditional(self) -> bool:
        """It takes class labels: a class embedding, or no diffusers config (labels as given)."""
        cfg = self.config
        return cfg is None or bool(cfg.get("num_class_embeds") or cfg.get("class_embed_type"))

    @property
    def num_classes(self) -> int | None:
        return (self.config or {}).get("num_class_embeds") or None

    def conditioning_spec(self) -> ConditioningSpec:
        return {"class_labels": TensorSpec(("batch",), "int64")} if self.class_conditional else {}

    def as_conditioning(self, labels: Any) -> dict[str, torch.Tensor]:
        if isinstance(labels, dict):
            return labels
        if labels is None or not self.class_conditional:  # diffusers refuses unused labels
            return {}
        return {"class_labels": labels}

    def encode(self, prompts=None, labels=None, height=None, width=None):
        return {} if labels is None else {"class_labels": torch.as_tensor(labels).long()}

    def null_conditioning(self, height, width):
        return None  # the null class is the checkpoint's (accel.json's null_class_label)

    def default_resolution(self) -> tuple[int, int]:
        size = self.config.sample_size
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)  # type: ignore

    def student_index(self, backbone: nn.Module, scheduler_class: str) -> dict[str, Any]:
        import diffusers

        # DDPMPipeline makes DiffusionPipeline.from_pretrained load the components; its __call__
        # knows no class labels, so the contract is the unet/ and scheduler/ pair in a plain loop.
        return {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", scheduler_class],
            "unet": ["diffusers", type(backbone).__name__],
        }

    def forward(self, backbone: nn.Module, x, t, cond):
        return backbone(x, t, class_labels=cond.get("class_labels")).sample

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
