"""Stable Diffusion 3 / 3.5 (Esser et al. 2024): ``SD3Transformer2DModel``, a rectified-flow MM-DiT
with two CLIP text encoders and an optional T5 (left out as diffusers allows), ``AutoencoderKL``.

Conditioning, as ``StableDiffusion3Pipeline`` builds it: ``encoder_hidden_states`` = the two CLIP
encoders' penultimate hidden states concatenated on the feature axis, zero-padded to the
transformer's ``joint_attention_dim``, followed on the sequence axis by T5's last hidden state (all
zeros, 256 tokens, without T5); ``pooled_projections`` = both encoders' projected pooled outputs.
The null conditioning is the empty prompt's. The backbone's timestep is the flow timestep sigma * T.

Without T5 the 256 zero tokens are one and the same token through every joint block (each context
token's norm, attention query and MLP see the same inputs), so eager forwards (training, sampling)
give the transformer one of them and raise its key's attention logit by log 256
(``RepeatedTokenAttention``): the same numbers up to float rounding, 3-4x cheaper at small sizes.
Exported and compiled graphs keep the stock forward, so bundles compute what the stock pipeline does.
"""

from __future__ import annotations

import math

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


class RepeatedTokenAttention:
    """diffusers' ``JointAttnProcessor2_0`` (SD3's joint attention, q/k norms included) for a
    context whose last token stands for ``copies`` identical tokens: that token's key logit is
    raised by log(copies), which is softmax attention over all the copies (their values are
    equal too). Without a context (SD3.5's image-only ``attn2``) it is the stock processor."""

    def __init__(self, copies: int) -> None:
        self.log_copies = math.log(copies)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):  # fmt: skip
        b, n = hidden_states.shape[:2]

        def heads(x, norm):
            x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return x if norm is None else norm(x)

        q = heads(attn.to_q(hidden_states), attn.norm_q)
        k = heads(attn.to_k(hidden_states), attn.norm_k)
        v = heads(attn.to_v(hidden_states), None)
        bias = None
        if encoder_hidden_states is not None:
            q = torch.cat([q, heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], 2)
            k = torch.cat([k, heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], 2)
            v = torch.cat([v, heads(attn.add_v_proj(encoder_hidden_states), None)], 2)
            bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
            bias[-1] = self.log_copies
            bias = bias.view(1, 1, 1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :n]))
        if encoder_hidden_states is None:
            return image
        context = out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return image, context


def repeated_tail(backbone: nn.Module, context: torch.Tensor) -> int:
    """How many trailing context tokens are zero in every row (T5's place without T5), when the
    eager forward may fold them into one (stock joint processors, not exporting or compiling);
    0 when it may not."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    if torch.compiler.is_compiling() or torch.jit.is_tracing() or context.shape[1] < 2:
        return 0
    processors = backbone.attn_processors.values()
    if not all(type(p) is JointAttnProcessor2_0 for p in processors):
        return 0
    nonzero = torch.nonzero(context.detach().abs().amax(dim=(0, 2)))
    last = int(nonzero[-1]) if len(nonzero) else -1
    tail = context.shape[1] - 1 - last
    return tail if tail > 1 else 0


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
        context = cond["encoder_hidden_states"]
        tail = repeated_tail(backbone, context)

        def call(context):
            return backbone(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=context,
                pooled_projections=cond["pooled_projections"],
            ).sample

        if not tail:
            return call(context)
        stock = backbone.attn_processors
        backbone.set_attn_processor(RepeatedTokenAttention(tail))
        try:
            return call(context[:, : context.shape[1] - tail + 1])
        finally:
            backbone.set_attn_processor(stock)
