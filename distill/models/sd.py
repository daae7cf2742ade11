"""Latent text-to-image UNets: Stable Diffusion 1.x/2.x (Rombach et al. 2022) and SDXL (Podell et
al. 2023), ``UNet2DConditionModel`` with CLIP text encoders and an ``AutoencoderKL``.

Conditioning, as ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` build it:

- SD: ``encoder_hidden_states`` = the CLIP encoder's last hidden state of the prompt padded to the
  tokenizer's ``model_max_length``; the null conditioning is the empty prompt's.
- SDXL: ``encoder_hidden_states`` = the penultimate hidden states of both encoders, concatenated on
  the feature axis; ``text_embeds`` = the second encoder's projected pooled output; ``time_ids`` =
  (original size, crop top-left, target size) = (H, W, 0, 0, H, W). With
  ``force_zeros_for_empty_prompt`` (SDXL's default) the null conditioning is all zeros, not the
  empty prompt's embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from accel.core.errors import CheckpointError
from distill.models.base import ConditioningSpec, ModelAdapter, TensorSpec


class StableDiffusionAdapter(ModelAdapter):
    denoiser_folder = "unet"
    components = ("vae", "text_encoder", "tokenizer")
    optional_components = ("text_encoder_2", "tokenizer_2")

    lora_targets = (
        "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
        "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
        "time_emb_proj",
    )  # fmt: skip
    """LCM-LoRA's layers (diffusers' ``train_lcm_distill_lora_sd*.py``): attention, the ResNets'
    convolutions and time projections, the samplers."""

    export_max_batch = 63  # diffusers' Upsample2D makes its input contiguous from batch 64 on

    default_guidance = 8.5  # LatentConsistencyModelPipeline's guidance_scale default
    guidance_scale: float | None = None  # set by the loader: the embedded w to sample with

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.xl and self.modules and self.modules.get("text_encoder_2") is None:
            raise CheckpointError(
                f"{self.root}: this SDXL UNet (addition_embed_type 'text_time') needs text_encoder_2/ "
                "and tokenizer_2/, which model_index.json does not list"
            )

    @property
    def guidance_in_model(self) -> bool:  # type: ignore[override]
        """LCM students embed w (``time_cond_proj_dim``): one pass, no classifier-free guidance."""
        return bool(self.config.get("time_cond_proj_dim"))

    @property
    def xl(self) -> bool:
        return self.config.get("addition_embed_type") == "text_time"

    @property
    def family(self) -> str:  # type: ignore[override]
        return self.family_of(self.config)

    @classmethod
    def family_of(cls, config) -> str:
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"

    def pipeline_class(self, backbone: nn.Module, scheduler_class: str) -> str | None:
        # an LCM student with LCM's w input ships as LCM checkpoints do; LatentConsistencyModel-
        # Pipeline always feeds that input, so one without it (LCM-LoRA) runs in the teacher's
        w_input = bool(backbone.config.get("time_cond_proj_dim"))
        if self.family == "sd" and scheduler_class == "LCMScheduler" and w_input:
            return "LatentConsistencyModelPipeline"
        return super().pipeline_class(backbone, scheduler_class)

    def conditioning_spec(self) -> ConditioningSpec:
        spec = {
            "encoder_hidden_states": TensorSpec(
                ("batch", "sequence", self.config.cross_attention_dim)
            )
        }
        if self.xl:
            enc2 = self.modules["text_encoder_2"].config
            spec["text_embeds"] = TensorSpec(("batch", enc2.projection_dim))
            spec["time_ids"] = TensorSpec(("batch", 6))
        if self.guidance_in_model:
            spec["timestep_cond"] = TensorSpec(("batch", self.config.time_cond_proj_dim))
        return spec

    def guidance_conditioning(self, w: float, n: int) -> dict[str, torch.Tensor]:
        return self.guidance_inputs(self.backbone, w, n)

    def with_guidance_input(self, backbone: nn.Module) -> nn.Module:
        return with_guidance_embedding(backbone)

    def guidance_inputs(self, backbone: nn.Module, w, n: int) -> dict[str, torch.Tensor]:
        dim = backbone.config.get("time_cond_proj_dim")
        if not dim:
            return {}
        ws = torch.as_tensor(w, dtype=torch.float32).cpu().expand(n)
        return {"timestep_cond": guidance_scale_embedding(ws - 1.0, dim)}

    @property
    def tokenizer_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("tokenizer", "tokenizer_2") if self.xl else ("tokenizer",)

    def encode_tokens(self, ids):
        encoders = [
            self.modules["text_encoder" + n[len("tokenizer") :]] for n in self.tokenizer_names
        ]
        device = next(encoders[0].parameters()).device
        outs = [
            e(i.to(device), output_hidden_states=True) for e, i in zip(encoders, ids, strict=True)
        ]
        if not self.xl:
            return {"encoder_hidden_states": outs[0].last_hidden_state.float()}
        return {
            "encoder_hidden_states": torch.cat([o.hidden_states[-2] for o in outs], -1).float(),
            "text_embeds": outs[1].text_embeds.float(),
        }

    def static_conditioning(self, n, height, width):
        scale = self.default_guidance if self.guidance_scale is None else self.guidance_scale
        out = self.guidance_conditioning(scale, n)
        if self.xl:
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
            out["time_ids"] = time_ids.expand(n, 6)
        return out

    def null_conditioning(self, height, width):
        if self.guidance_in_model:
            return None
        cond = self.encode([""], height=height, width=width)
        if self.xl and self.force_zeros:
            cond["encoder_hidden_states"] = torch.zeros_like(cond["encoder_hidden_states"])
            cond["text_embeds"] = torch.zeros_like(cond["text_embeds"])
        return cond

    @property
    def force_zeros(self) -> bool:
        """SDXL pipelines register ``force_zeros_for_empty_prompt`` (default true) in model_index."""
        return bool(self.index.get("force_zeros_for_empty_prompt", True))

    def forward(self, backbone: nn.Module, x, t, cond):
        added = None
        if self.xl:
            added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        # only a backbone with a w embedding takes it (a student's; its teacher has none)
        w_cond = cond.get("timestep_cond") if backbone.config.get("time_cond_proj_dim") else None
        return backbone(
            x,
            t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep_cond=w_cond,
            added_cond_kwargs=added,
        ).sample

    def _latents_stats(self):
        vae = self.modules["vae"]
        mean, std = (getattr(vae.config, k, None) for k in ("latents_mean", "latents_std"))
        if mean is None or std is None:
            return None
        return torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def encode_images(self, images):
        stats = self._latents_stats()
        if stats is None:
            return super().encode_images(images)
        vae = self.modules["vae"]
        z = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist.mean.float()
        return (z - stats[0]) * vae.config.scaling_factor / stats[1]

    def decode(self, latents):
        stats = self._latents_stats()
        if stats is None:
            return super().decode(latents)
        vae = self.modules["vae"]
        z = latents * stats[1] / vae.config.scaling_factor + stats[0]
        return vae.decode(z).sample.float()


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of w that LCM students take as ``timestep_cond`` (Luo et al.
    2023, sec. 4.2; as ``LatentConsistencyModelPipeline`` computes it from ``guidance_scale - 1``):
    sin and cos of 1000 w at ``dim / 2`` geometric frequencies from 1 to 1 / 10000."""
    half = dim // 2
    # in float32 throughout, as the pipeline computes it: arguments reach 1000 w radians, where
    # one ulp of a float64 frequency would move the embedding by 1e-4
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    arg = (w.float() * 1000.0)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def with_guidance_embedding(unet: nn.Module, dim: int = 256) -> nn.Module:
    """A copy of ``unet`` that also takes w (``time_cond_proj_dim = dim``), its new projection
    zero-initialised so that it computes exactly what ``unet`` does until trained (LCM's
    student initialisation)."""
    student = type(unet).from_config({**unet.config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(next(unet.parameters()).device)
