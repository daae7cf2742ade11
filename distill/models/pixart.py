"""PixArt-alpha / PixArt-Sigma (Chen et al. 2023, 2024): ``PixArtTransformer2DModel``, a DiT with
cross-attention to T5 and a learned-variance output (the second half of the channels, split off
here: samplers use the first half, the epsilon prediction), DDPM timesteps, ``AutoencoderKL``.

Conditioning, as ``PixArtSigmaPipeline`` builds it: the prompt lower-cased and stripped (the
pipeline's own caption cleaning when bs4 and ftfy are absent; with them installed it runs a
regex clean-up this adapter does not), T5 hidden states of 300 tokens (``max_sequence_length``) and
their attention mask; the null conditioning is the empty prompt's.
"""

from __future__ import annotations

from torch import nn

from distill.models.base import ConditioningSpec, ModelAdapter, TensorSpec, warn_truncated


class PixArtAdapter(ModelAdapter):
    family = "pixart"
    components = ("vae", "text_encoder", "tokenizer")
    max_sequence_length = 300

    def conditioning_spec(self) -> ConditioningSpec:
        return {
            "encoder_hidden_states": TensorSpec(
                ("batch", "sequence", self.config.cross_attention_dim)
            ),
            "encoder_attention_mask": TensorSpec(("batch", "sequence"), "int64"),
        }

    tokenizer_names = ("tokenizer",)
    normalize_prompts = True  # lower-cased and stripped, in the exported tokenizer.json too

    def token_length(self, name: str) -> int:
        return self.max_sequence_length

    def tokenize(self, prompts):
        tok = self.modules["tokenizer"]
        prompts = [p.lower().strip() for p in prompts]
        warn_truncated(tok, prompts, self.max_sequence_length)
        ids = tok(
            prompts, padding="max_length", max_length=self.max_sequence_length,
            truncation=True, add_special_tokens=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        return [ids]

    def encode_tokens(self, ids):
        """T5's last hidden state with the attention mask of the real tokens (EOS included; the
        tokenizer's mask is the ids that are not padding)."""
        encoder = self.modules["text_encoder"]
        ids = ids[0].to(next(encoder.parameters()).device)
        mask = (ids != self.modules["tokenizer"].pad_token_id).long()
        hidden = encoder(ids, attention_mask=mask)[0].float()
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

    def prepare_export(self, backbone: nn.Module) -> None:
        """diffusers' ``PixArtTransformer2DModel`` ends with ``proj_out(h).squeeze(1)``, a no-op
        on (B, N, C) tokens that both ONNX exporters turn into a real Squeeze of axis 1 (size N),
        which onnxruntime refuses at load. A forward hook makes ``proj_out`` return (B, 1, N, C),
        so the squeeze removes a real unit axis: the same numbers, a valid graph."""
        if not getattr(backbone.proj_out, "_accel_unit_axis", False):
            backbone.proj_out.register_forward_hook(lambda m, i, out: out.unsqueeze(1))
            backbone.proj_out._accel_unit_axis = True

    def forward(self, backbone: nn.Module, x, t, cond):
        out = backbone(
            x,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        if self.config.out_channels // 2 == self.config.in_channels:  # learned variance
            out = out.chunk(2, dim=1)[0]
        return out
