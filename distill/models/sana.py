"""Sana (Xie et al. 2024): ``SanaTransformer2DModel``, a linear-attention DiT trained with flow
matching, a Gemma-2 text encoder and the 32x deep-compression autoencoder ``AutoencoderDC``.

Conditioning, as ``SanaPipeline`` builds it: the prompt lower-cased and stripped, prefixed by the
pipeline's complex human instruction (read from the stock pipeline's own default, not copied), Gemma's
last hidden states and attention mask of ``len(instruction tokens) + 298`` tokens, of which the first
and the last 299 are kept (300); the null conditioning is the empty prompt's without the
instruction, 300 tokens. The backbone's timestep is the flow timestep times ``timestep_scale``.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from distill.models.base import ConditioningSpec, ModelAdapter, TensorSpec, warn_truncated


def default_instruction() -> list[str] | None:
    from diffusers import SanaPipeline

    return inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


class SanaAdapter(ModelAdapter):
    family = "sana"
    components = ("vae", "text_encoder", "tokenizer")
    max_sequence_length = 300

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.instruction = default_instruction()

    @property
    def vae_scale_factor(self) -> int:  # type: ignore[override]
        vae = self.modules.get("vae")
        return 2 ** (len(vae.config.encoder_block_out_channels) - 1) if vae is not None else 32

    def conditioning_spec(self) -> ConditioningSpec:
        return {
            "encoder_hidden_states": TensorSpec(
                ("batch", "sequence", self.config.cross_attention_dim)
            ),
            "encoder_attention_mask": TensorSpec(("batch", "sequence"), "int64"),
        }

    tokenizer_names = ("tokenizer",)
    normalize_prompts = True  # lower-cased and stripped, then the instruction prepended

    @property
    def prompt_prefix(self) -> str:  # type: ignore[override]
        return "\n".join(self.instruction) if self.instruction else ""

    def token_length(self, name: str) -> int:
        if not self.prompt_prefix:
            return self.max_sequence_length
        tok = self.modules["tokenizer"]
        return len(tok.encode(self.prompt_prefix)) + self.max_sequence_length - 2

    def _ids(self, prompts: list[str], instruction: bool) -> torch.Tensor:
        tok = self.modules["tokenizer"]
        tok.padding_side = "right"
        prompts = [p.lower().strip() for p in prompts]
        max_length = self.max_sequence_length
        if instruction and self.prompt_prefix:
            prompts = [self.prompt_prefix + p for p in prompts]
            max_length = self.token_length("tokenizer")
        warn_truncated(tok, prompts, max_length)
        return tok(
            prompts, padding="max_length", max_length=max_length, truncation=True,
            add_special_tokens=True, return_tensors="pt",
        ).input_ids  # fmt: skip

    def tokenize(self, prompts):
        return [self._ids(prompts, instruction=True)]

    def encode_tokens(self, ids):
        """Gemma's last hidden states and the mask of the non-padding ids; with the instruction,
        its first token and the last 299 kept (300), as the pipeline keeps them."""
        enc = self.modules["text_encoder"]
        ids = ids[0].to(next(enc.parameters()).device)
        mask = (ids != self.modules["tokenizer"].pad_token_id).long()
        hidden = enc(ids, attention_mask=mask)[0].float()
        if ids.shape[1] > self.max_sequence_length:  # the instruction's tokens dropped
            keep = [0, *range(ids.shape[1] - self.max_sequence_length + 1, ids.shape[1])]
            hidden, mask = hidden[:, keep], mask[:, keep]
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

    def null_conditioning(self, height, width):
        return self.encode_tokens([self._ids([""], instruction=False)])

    def forward(self, backbone: nn.Module, x, t, cond):
        scale = self.config.get("timestep_scale", 1.0) or 1.0
        out = backbone(
            x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=t * scale,
        ).sample
        if self.config.out_channels // 2 == self.config.in_channels:  # learned variance
            out = out.chunk(2, dim=1)[0]
        return out.float()

    def decode(self, latents):
        vae = self.modules["vae"]
        return vae.decode(latents / vae.config.scaling_factor).sample.float()
