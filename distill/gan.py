"""The adversarial parts DMD2 (Yin et al. 2024) and ADD (Sauer et al. 2023) share, and the
distribution-matching gradient DMD2 and rCM share: the discriminator head on the critic's (or the
teacher's) features, the forward hook that taps them, the default tap per backbone, the
generator with its w input, and the teacher of a student being fine-tuned."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from accel.core.errors import StageError
from accel.core.model_info import ModelInfo
from accel.core.stage import StageContext
from distill.checkpoint import load_denoiser, load_teacher
from distill.denoiser import Denoiser, takes_w, w_conditioning


def generator_with_w(
    adapter: Any, init: nn.Module, w: float, device: torch.device | str
) -> tuple[nn.Module, Callable[[Any, int], Any]]:
    """The trainable generator of the GAN methods (DMD2, ADD): a copy of ``init`` given the
    family's w input where it has none (LCM's, SD and SDXL), and ``w_conditioning``'s ``add`` for
    it, so that it learns the teacher guided at ``w``, given w (the teacher and the critic have no
    such input and ignore it)."""
    import copy

    net = copy.deepcopy(init)
    if not takes_w(net):
        net = adapter.with_guidance_input(net) or net
    net = net.requires_grad_(True).train()
    return net, w_conditioning(adapter, net, w, device)


class Discriminator(nn.Module):
    """DMD2's classification branch: a small head on the critic's bottleneck features, built for
    their shape (B x C x H x W feature maps, B x N x C token features, or B x F vectors); one
    logit per sample."""

    def __init__(self, feature_shape: torch.Size) -> None:
        super().__init__()
        c = feature_shape[1]
        if len(feature_shape) == 4:
            self.net: nn.Module = nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1),
                nn.GroupNorm(min(32, c // 4) or 1, c),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(c, 1),
            )
        else:
            c = feature_shape[-1]
            self.net = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = features.to(next(self.parameters()).dtype)  # a half-precision LoRA base's
        if features.dim() == 3:  # tokens: the per-token head, averaged over tokens
            return self.net(features).mean(1).squeeze(-1)
        return self.net(features).squeeze(-1)


class FeatureTap:
    """Keeps the output of one submodule from the last forward pass (a forward hook)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            raise StageError(
                "adversarial",
                f"feature_module {name!r} is not a submodule of the {type(module).__name__} "
                "backbone; name its bottleneck (for diffusers UNets: 'mid_block')",
            ) from None
        self.value: torch.Tensor | None = None
        sub.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        self.value = output[0] if isinstance(output, tuple) else output


def dmd_gradient(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> torch.Tensor:
    """DMD's normalised distribution-matching direction (mu_fake - mu_real) / mean|x - mu_real|."""
    dims = tuple(range(1, x.dim()))
    weight = (x - real_x0).abs().mean(dims, keepdim=True).clamp(min=1e-8)
    return torch.nan_to_num((fake_x0 - real_x0) / weight)


def feature_module(backbone: nn.Module) -> str:
    """The default discriminator tap: a UNet's ``mid_block``, or the image-token MLP (``ff``) of
    a transformer's middle block (its output is one tensor of B x N x C token features)."""
    if hasattr(backbone, "mid_block"):
        return "mid_block"
    blocks = getattr(backbone, "transformer_blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[0], "ff"):
        return f"transformer_blocks.{len(blocks) // 2}.ff"
    raise StageError(
        "adversarial",
        f"{type(backbone).__name__} has neither a mid_block nor transformer_blocks[i].ff; set "
        "feature_module to the submodule whose output the discriminator should read",
    )


def find_teacher(
    ctx: StageContext, guidance_scale: float, stage: str = "adversarial", dtype=None
) -> tuple[Denoiser, nn.Module, ModelInfo]:
    """(teacher, generator initialisation, teacher info). The input is the teacher, or a distilled
    student to fine-tune, whose teacher is the checkpoint its lineage in the store starts from.
    ``dtype``: the teacher's denoiser's in memory (a LoRA student's base; default float32)."""

    def is_student(path: Path) -> bool:
        return ModelInfo.read(path).is_student

    if not is_student(ctx.input.path):
        teacher, info = load_teacher(ctx.input.path, stage, guidance_scale, flow=True, dtype=dtype)
        return teacher, teacher.backbone, info
    for artifact in ctx.store.lineage(ctx.input)[1:]:
        if artifact.kind == "checkpoint" and not is_student(artifact.path):
            student, _ = load_denoiser(ctx.input.path, guidance_scale=1.0)
            teacher, info = load_teacher(artifact.path, stage, guidance_scale, flow=True)
            return teacher, student.backbone, info
    raise StageError(
        stage,
        f"{ctx.input.path} is a distilled student and its teacher is not in the store; fine-tune "
        "it in the recipe that distilled it (the teacher is the recipe's source), or distil from "
        "the teacher",
    )
