"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): ``SD3Transformer2DModel``, a rectified-flow MM-DiT
with two CLIP text encoders and an optional T5 (left out as diffusers allows), ``AutoencoderKL``.

Conditioning, as ``StableDiffusion3Pipeline`` builds it: ``encoder_hidden_states`` = the two CLIP
encoders' penultimate hidden states concatenated on the feature axis, zero-padded to the
transformer's ``joint_attention_dim``, followed on the sequence axis by T5's last hidden state (all
zeros, 256 tokens, without T5); ``pooled_projections`` = both encoders' projected pooled outputs.
The null conditioning is the empty prompt's. The backbone's timestep is the flow timestep sigma * T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distill.models.base import ConditioningSpec, ModelAdapter, TensorSpec


def calculate_shift(seq_len: int, config: dict, max_shift_default: float) -> float:
    """mu of the dynamic (resolution-dependent) shift: linear in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as diffusers computes it."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", max_shift_default)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + base_shift - m * base_len


class SD3Adapter(ModelAdapter):
    family = "sd3"
    components = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    optional_components = ("text_encoder_3", "tokenizer_3")
    max_sequence_length = 256

    def conditioning_spec(self) -> ConditioningSpec:
        return {
            "encoder_hidden_states": TensorSpec(
                ("batch", "sequence", self.config.joint_attention_dim)
            ),
            "pooled_projections": TensorSpec(("batch", self.config.pooled_projection_dim)),
        }

    @property
    def tokenizer_names(self) -> tuple[str, ...]:  # type: ignore[override]
        t5 = self.modules.get("text_encoder_3") is not None
        return ("tokenizer", "tokenizer_2", *(("tokenizer_3",) if t5 else ()))

    def token_length(self, name: str) -> int:
        if name == "tokenizer_3":
            return self.max_sequence_length
        return super().token_length(name)

    def encode_tokens(self, ids):
        hidden, pooled = [], []
        for enc, i in zip(("text_encoder", "text_encoder_2"), ids[:2], strict=True):
            encoder = self.modules[enc]
            out = encoder(i.to(next(encoder.parameters()).device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        joint = self.config.joint_attention_dim
        clip = F.pad(clip, (0, joint - clip.shape[-1]))
        if len(ids) == 3:
            t5_enc = self.modules["text_encoder_3"]
            t5 = t5_enc(ids[2].to(next(t5_enc.parameters()).device))[0].to(clip.dtype)
        else:  # no T5: the pipeline's zeros in its place
            t5 = clip.new_zeros(clip.shape[0], self.max_sequence_length, joint)
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2).float(),
            "pooled_projections": torch.cat(pooled, dim=-1).float(),
        }

    def timestep_kwargs(self, steps, height, width):
        if not self.scheduler_config.get("use_dynamic_shifting"):
            return {}
        k = self.vae_scale_factor * self.patch_size
        return {"mu": calculate_shift((height // k) * (width // k), self.scheduler_config, 1.16)}

    def forward(self, backbone: nn.Module, x, t, cond):
        return backbone(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
        ).sample
