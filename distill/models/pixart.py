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

from accel.core.errors import CheckpointError
from distill.models.base import ConditioningSpec, ModelAdapter, TensorSpec, masked_encode


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

    def encode(self, prompts=None, labels=None, height=None, width=None):
        if prompts is None:
            raise CheckpointError("PixArt models are conditioned on prompts: give --prompt")
        hidden, mask = masked_encode(
            self.modules["text_encoder"],
            self.modules["tokenizer"],
            [p.lower().strip() for p in prompts],
            self.max_sequence_length,
        )
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

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
