"""FLUX.1 (Black Forest Labs 2024): ``FluxTransformer2DModel``, a rectified-flow MM-DiT over 2x2-packed
latents, with CLIP (pooled) and T5 (sequence) text encoders and ``AutoencoderKL``.

As ``FluxPipeline`` builds them: latents are packed (B, (h/2)(w/2), 4C), channel c*4 + dy*2 + dx;
``img_ids`` rows are (0, row, col) of the packed grid and ``txt_ids`` zeros, both shared by the
batch; ``pooled_projections`` is CLIP's unprojected pooled output and ``encoder_hidden_states`` T5's
last hidden state (512 tokens, no mask). FLUX.1-dev embeds the guidance scale (``guidance``; one
pass per step, no classifier-free guidance); FLUX.1-schnell has no guidance input. The backbone
takes the flow timestep divided by T (``timestep / 1000``). The sampling grid is diffusers':
sigmas linspace(1, 1/n, n) shifted by mu, linear in the image's token count.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from accel.core.errors import CheckpointError
from distill.models.base import ConditioningSpec, ModelAdapter, TensorSpec
from distill.models.sd3 import calculate_shift


def image_ids(gh: int, gw: int) -> torch.Tensor:
    """``img_ids`` of a gh x gw packed grid: rows (0, row, col), as FluxPipeline builds them."""
    ids = torch.zeros(gh, gw, 3)
    ids[..., 1] += torch.arange(gh)[:, None]
    ids[..., 2] += torch.arange(gw)[None, :]
    return ids.reshape(gh * gw, 3)


class FluxAdapter(ModelAdapter):
    family = "flux"
    components = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    max_sequence_length = 512
    default_sample_size = 128  # FluxPipeline's: the transformer's config has no sample_size
    default_guidance = 3.5  # FluxPipeline's guidance_scale default

    @property
    def guidance_in_model(self) -> bool:  # type: ignore[override]
        return bool(self.config.get("guidance_embeds"))

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels // 4

    def default_resolution(self) -> tuple[int, int]:
        size = self.default_sample_size * self.vae_scale_factor
        return size, size

    def check_resolution(self, height, width):
        k = self.vae_scale_factor * 2
        if height % k or width % k or height <= 0 or width <= 0:
            raise CheckpointError(
                f"flux draws images whose height and width are multiples of {k}; got "
                f"{height}x{width}"
            )

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        k = self.vae_scale_factor * 2
        return height // k, width // k

    def latent_shape(self, height, width):
        gh, gw = self._grid(height, width)
        return [gh * gw, self.latent_channels * 4]

    def conditioning_spec(self) -> ConditioningSpec:
        spec = {
            "encoder_hidden_states": TensorSpec(
                ("batch", "sequence", self.config.joint_attention_dim)
            ),
            "pooled_projections": TensorSpec(("batch", self.config.pooled_projection_dim)),
            "txt_ids": TensorSpec(("sequence", 3)),
            "img_ids": TensorSpec(("image_sequence", 3)),
        }
        if self.guidance_in_model:
            spec["guidance"] = TensorSpec(("batch",))
        return spec

    guidance_scale: float | None = None  # set by the loader: the embedded guidance to sample with

    tokenizer_names = ("tokenizer", "tokenizer_2")

    def token_length(self, name: str) -> int:
        return self.max_sequence_length if name == "tokenizer_2" else super().token_length(name)

    def encode_tokens(self, ids):
        clip, t5 = self.modules["text_encoder"], self.modules["text_encoder_2"]
        pooled = clip(ids[0].to(next(clip.parameters()).device), output_hidden_states=False)
        hidden = t5(ids[1].to(next(t5.parameters()).device), output_hidden_states=False)[0]
        return {
            "encoder_hidden_states": hidden.float(),
            "pooled_projections": pooled.pooler_output.float(),
        }

    def static_conditioning(self, n, height, width):
        """The position ids (shared by the batch) and, for FLUX.1-dev, w (``guidance``)."""
        out = {
            "txt_ids": torch.zeros(self.max_sequence_length, 3),
            "img_ids": image_ids(*self._grid(height, width)),
        }
        if self.guidance_in_model:
            w = self.default_guidance if self.guidance_scale is None else self.guidance_scale
            out["guidance"] = torch.full((n,), float(w))
        return out

    def null_conditioning(self, height, width):
        return None if self.guidance_in_model else super().null_conditioning(height, width)

    def timestep_kwargs(self, steps, height, width):
        kwargs: dict = {"sigmas": np.linspace(1.0, 1 / steps, steps)}  # as FluxPipeline
        if self.scheduler_config.get("use_dynamic_shifting"):
            gh, gw = self._grid(height, width)
            kwargs["mu"] = calculate_shift(gh * gw, self.scheduler_config, 1.15)
        return kwargs

    w_inputs = ("guidance",)

    def with_guidance_input(self, backbone: nn.Module) -> nn.Module:
        """FLUX.1-dev's form of a schnell-style backbone: ``guidance_embeds`` on, the guidance
        embedder's last layer zero-initialised (the student starts as the teacher at every w)."""
        from diffusers import FluxTransformer2DModel

        student = FluxTransformer2DModel.from_config({**backbone.config, "guidance_embeds": True})
        missing, unexpected = student.load_state_dict(backbone.state_dict(), strict=False)
        assert not unexpected and all("guidance_embedder" in k for k in missing), missing
        last = student.time_text_embed.guidance_embedder.linear_2
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return student.to(next(backbone.parameters()).dtype)

    def guidance_inputs(self, backbone, w, n):
        if not backbone.config.get("guidance_embeds"):
            return {}
        return {"guidance": torch.as_tensor(w, dtype=torch.float32).cpu().expand(n)}

    def forward(self, backbone: nn.Module, x, t, cond):
        """The backbone call; inputs the stock pipeline derives (the position ids from the
        shapes, w from the guidance scale) are filled in where ``cond`` lacks them (training
        data keeps only the per-example text conditioning)."""
        guidance = cond.get("guidance")
        if guidance is None and backbone.config.get("guidance_embeds"):
            w = self.default_guidance if self.guidance_scale is None else self.guidance_scale
            guidance = torch.full((len(x),), float(w), device=x.device)
        img_ids = cond.get("img_ids")
        if img_ids is None:
            gh, gw = self._grid(*(self.resolution or self.default_resolution()))
            if gh * gw != x.shape[1]:
                gh = gw = int(round(x.shape[1] ** 0.5))
            img_ids = image_ids(gh, gw).to(x.device)
        hidden = cond["encoder_hidden_states"]
        txt_ids = cond.get("txt_ids")
        if txt_ids is None:
            txt_ids = torch.zeros(hidden.shape[1], 3, device=x.device)
        return backbone(
            hidden_states=x,
            timestep=t.float() / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=txt_ids,
            img_ids=img_ids,
        ).sample

    def encode_images(self, images):
        z = super().encode_images(images)  # N x C x H x W
        n, c, h, w = z.shape
        z = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(n, (h // 2) * (w // 2), c * 4)

    def decode(self, latents):
        n, seq, ch = latents.shape
        if self.resolution is not None:
            gh, gw = self._grid(*self.resolution)
        else:  # a square grid
            gh = gw = int(round(seq**0.5))
        c = ch // 4
        x = latents.view(n, gh, gw, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, gh * 2, gw * 2)
        return super().decode(x)
