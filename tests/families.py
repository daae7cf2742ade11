"""Tiny stock diffusers pipelines of each model family, built offline from configs.

Test fixtures only (no tests here). Every pipeline is the stock diffusers class with the
component layout of the real checkpoint it stands for (same classes, same scheduler config,
same conditioning plumbing), shrunk to 0.1-0.25 M parameters per pipeline so that building
all of them takes a few seconds on a CPU and a 2-step call well under a second.

- No network: tokenizers are built from tiny vocabularies with the ``tokenizers`` library
  (byte-level BPE for CLIP, Unigram for T5, byte-fallback BPE for Gemma), wrapped in the
  transformers classes the real pipelines use, so ``save_pretrained`` / ``from_pretrained``
  round-trip offline. Any English prompt tokenizes (CLIP and Gemma cover every byte; T5
  covers printable ASCII, anything else maps to ``<unk>``).
- Deterministic: every model is built right after ``torch.manual_seed`` (``seed`` plus a fixed
  per-component offset, so two encoders with one config do not get equal weights); two calls
  with one seed give identical weights.
- float32, CPU, ``eval()``, progress bars disabled.

API: ``FAMILIES``, ``RESOLUTION``, ``build_pipeline``, ``write_pipeline``, ``stock_kwargs``;
``latent_shape`` gives the shape of the ``latents=`` argument of the stock pipeline;
``load_kwargs`` / ``load_pipeline`` reload a written pipeline (SD3 needs ``text_encoder_3=None``).
"""

from __future__ import annotations

import pathlib
import string

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "pixart_sigma", "sana", "dit")

# Pixel size (height, width) each tiny pipeline draws by default. All VAEs here downsample by 2,
# so latents are 16 x 16. Sana needs multiples of 32; SD3/Flux multiples of 4.
RESOLUTION = {family: (32, 32) for family in FAMILIES}

VAE_SCALE_FACTOR = 2
LATENT_CHANNELS = {
    "sd15": 4,
    "sdxl": 4,
    "sd3": 16,
    "flux": 16,
    "pixart_sigma": 4,
    "sana": 4,
    "dit": 4,
}

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
GEMMA_MAX_LENGTH = 512
# T5 / Gemma token budget passed as ``max_sequence_length`` (real pipelines use 256-512).
MAX_SEQUENCE_LENGTH = 16

# DiTPipeline hard-codes the null (unconditional) class as 1000, so the label embedding must have
# ImageNet's 1000 classes (+1 CFG row); with hidden size 32 that table is still tiny.
DIT_NUM_CLASSES = 1000

# Schedulers as the real checkpoints ship them (DDIM stands in for PNDM/Euler/DPM-Solver,
# with the Stable Diffusion betas).
DDIM_SD = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}
DDIM_LINEAR = {**DDIM_SD, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
FLOW_SHIFT3 = {"num_train_timesteps": 1000, "shift": 3.0}
FLOW_FLUX = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def latent_shape(family: str, batch: int = 1, height: int | None = None, width: int | None = None):
    """Shape of the stock pipeline's ``latents=`` argument at (height, width) (RESOLUTION by default).

    Flux takes packed latents ``(B, (h/2)*(w/2), 4*C)``; the others ``(B, C, h, w)`` with
    ``h, w = H/2, W/2``. DiTPipeline has no ``latents=`` argument: its shape is that of the
    latents it samples internally from ``generator``.
    """
    _check(family)
    H, W = RESOLUTION[family]
    h, w = (height or H) // VAE_SCALE_FACTOR, (width or W) // VAE_SCALE_FACTOR
    c = LATENT_CHANNELS[family]
    if family == "flux":
        return (batch, (h // 2) * (w // 2), 4 * c)
    return (batch, c, h, w)


def stock_kwargs(family: str) -> dict:
    """Extra ``__call__`` kwargs for deterministic, comparable runs of the stock pipeline.

    Includes ``height``/``width`` (RESOLUTION) for every family whose pipeline takes them (Sana and
    Flux otherwise default to 1024 px); merge with ``{**stock_kwargs(f), ...}`` to override.
    """
    _check(family)
    if family == "dit":
        return {}  # DiTPipeline's size comes from transformer.config.sample_size
    H, W = RESOLUTION[family]
    kw: dict = {"height": H, "width": W}
    if family in ("sd3", "flux"):
        # SD3: length of the all-zero T5 block (text_encoder_3 is None); Flux: T5 tokens.
        kw["max_sequence_length"] = MAX_SEQUENCE_LENGTH
    if family == "pixart_sigma":
        kw.update(
            use_resolution_binning=False,  # binning only knows sample_size 32..256 and resizes
            clean_caption=False,  # needs bs4 + ftfy; without them it only warns
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
    if family == "sana":
        kw.update(
            use_resolution_binning=False,  # binning would snap 32 px to a 512+ px bin
            complex_human_instruction=None,  # default prepends a ~300-token instruction
            clean_caption=False,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
    return kw


# --------------------------------------------------------------------------------------------
# Tokenizers (offline)


def _printable() -> list[str]:
    return [c for c in string.printable if not c.isspace()]


def clip_tokenizer():
    """CLIP byte-level BPE: 256 byte symbols, their end-of-word forms, BOS, EOS (514 tokens), no
    merges (the text teacher's builder, ``accel.assets.make_text_teacher.clip_tokenizer``)."""
    from accel.assets.make_text_teacher import clip_tokenizer as build

    return build(words=(), model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer():
    """T5 Unigram (SentencePiece-like): <pad>=0, </s>=1, <unk>=2, then '▁' and ASCII pieces."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import T5TokenizerFast

    chars = _printable()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -4.5) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )


def gemma_tokenizer():
    """Gemma byte-fallback BPE: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4, <0x00>..<0xFF>, '▁', ASCII."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import GemmaTokenizerFast

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tokens += [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + _printable()
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=[], fuse_unk=True, unk_token="<unk>", byte_fallback=True)
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(
        pattern=" ", behavior="merged_with_previous", invert=False
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=["<bos>", "$A"], pair=["<bos>", "$A", "<bos>", "$B"], special_tokens=[("<bos>", 2)]
    )
    return GemmaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=GEMMA_MAX_LENGTH,
    )


# --------------------------------------------------------------------------------------------
# Models


def _seed(seed: int, component: int) -> None:
    import torch

    torch.manual_seed(seed * 1009 + component)


def _clip(seed, component, tokenizer, hidden=32, projection=False, projection_dim=32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _seed(seed, component)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config)


def _t5(seed, component, tokenizer, d_model=32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_decoder_layers=0,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (Flux, PixArt, SD3 use t5-v1_1-xxl)
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    _seed(seed, component)
    return T5EncoderModel(config)


def _gemma2(seed, component, tokenizer, hidden=32):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=GEMMA_MAX_LENGTH,
        sliding_window=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        attn_implementation="eager",  # Gemma2's attention soft-capping
    )
    _seed(seed, component)
    return Gemma2Model(config)


def _vae_kl(
    seed, component, latent_channels=4, scaling_factor=0.18215, shift_factor=None, quant_conv=True
):
    from diffusers import AutoencoderKL

    _seed(seed, component)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),  # 2 blocks: scale factor 2
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def _vae_dc(seed, component, latent_channels=4):
    from diffusers import AutoencoderDC

    _seed(seed, component)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),  # 2 blocks: scale factor 2
        decoder_block_out_channels=(8, 8),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def _latent_size(family):
    H, W = RESOLUTION[family]
    assert H == W
    return H // VAE_SCALE_FACTOR


def _sd15(seed):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = clip_tokenizer()
    text_encoder = _clip(seed, 1, tokenizer, hidden=32)
    _seed(seed, 2)
    unet = UNet2DConditionModel(
        sample_size=_latent_size("sd15"),
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    return StableDiffusionPipeline(
        vae=_vae_kl(seed, 3, 4, scaling_factor=0.18215),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**DDIM_SD),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl(seed):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    # CLIP-L (hidden 32) + OpenCLIP-G (hidden 48, projection 32), like 768 + 1280.
    text_encoder = _clip(seed, 1, tokenizer, hidden=32)
    text_encoder_2 = _clip(seed, 2, tokenizer_2, hidden=48, projection=True, projection_dim=32)
    addition_time_embed_dim = 8
    _seed(seed, 3)
    unet = UNet2DConditionModel(
        sample_size=_latent_size("sdxl"),
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=32 + 48,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        # pooled text_embeds (projection_dim) + 6 micro-conditions (size, crop, target size)
        projection_class_embeddings_input_dim=32 + 6 * addition_time_embed_dim,
        norm_num_groups=4,
    )
    return StableDiffusionXLPipeline(
        vae=_vae_kl(seed, 4, 4, scaling_factor=0.13025),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=DDIMScheduler(**DDIM_SD),
    )


def _sd3(seed):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    text_encoder = _clip(seed, 1, tokenizer, hidden=32, projection=True, projection_dim=32)
    text_encoder_2 = _clip(seed, 2, tokenizer_2, hidden=48, projection=True, projection_dim=32)
    _seed(seed, 3)
    transformer = SD3Transformer2DModel(
        sample_size=_latent_size("sd3"),
        patch_size=2,
        in_channels=LATENT_CHANNELS["sd3"],
        out_channels=LATENT_CHANNELS["sd3"],
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        # CLIP hidden states (32 + 48) are zero-padded up to the T5 width, like 2048 -> 4096.
        joint_attention_dim=96,
        caption_projection_dim=32,
        pooled_projection_dim=32 + 32,  # concatenated CLIP text_embeds
        pos_embed_max_size=32,  # latents up to 64 x 64 (128 px)
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SHIFT3),
        vae=_vae_kl(seed, 4, LATENT_CHANNELS["sd3"], 1.5305, 0.0609, quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _flux(seed):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = _clip(seed, 1, tokenizer, hidden=32)
    text_encoder_2 = _t5(seed, 2, tokenizer_2, d_model=32)
    _seed(seed, 3)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS["flux"],  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP pooler output
        guidance_embeds=True,  # Flux-dev
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_FLUX),
        vae=_vae_kl(seed, 4, LATENT_CHANNELS["flux"], 0.3611, 0.1159, quant_conv=False),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _pixart_sigma(seed):
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tokenizer = t5_tokenizer()
    text_encoder = _t5(seed, 1, tokenizer, d_model=32)
    c = LATENT_CHANNELS["pixart_sigma"]
    _seed(seed, 2)
    transformer = PixArtTransformer2DModel(
        sample_size=_latent_size("pixart_sigma"),
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=32,  # T5 d_model
        cross_attention_dim=32,  # = inner dim
        in_channels=c,
        out_channels=2 * c,  # learned sigma
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae_kl(seed, 3, c, scaling_factor=0.13025),
        transformer=transformer,
        scheduler=DDIMScheduler(**DDIM_LINEAR),
    )


def _sana(seed):
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer = gemma_tokenizer()
    text_encoder = _gemma2(seed, 1, tokenizer, hidden=32)
    c = LATENT_CHANNELS["sana"]
    _seed(seed, 2)
    transformer = SanaTransformer2DModel(
        sample_size=_latent_size("sana"),
        patch_size=1,
        in_channels=c,
        out_channels=c,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,  # Gemma2 hidden size
        mlp_ratio=2.5,
    )
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae_dc(seed, 3, c),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SHIFT3),
    )


def _dit(seed):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    c = LATENT_CHANNELS["dit"]
    _seed(seed, 1)
    transformer = DiTTransformer2DModel(
        sample_size=_latent_size("dit"),
        patch_size=2,
        in_channels=c,
        out_channels=2 * c,  # learned sigma
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_embeds_ada_norm=DIT_NUM_CLASSES,
        norm_type="ada_norm_zero",
        norm_num_groups=32,
    )
    return DiTPipeline(
        transformer=transformer,
        vae=_vae_kl(seed, 2, c, scaling_factor=0.18215),
        scheduler=DDIMScheduler(**DDIM_SD),
    )


_BUILDERS = {
    "sd15": _sd15,
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": _flux,
    "pixart_sigma": _pixart_sigma,
    "sana": _sana,
    "dit": _dit,
}


def prepare(pipe):
    """eval() on every model of ``pipe`` (all are built float32), progress bar off; returns ``pipe``."""
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_pipeline(family: str, seed: int = 0):
    """A tiny stock diffusers pipeline of ``family``: float32, CPU, eval, seeded weights."""
    _check(family)
    return prepare(_BUILDERS[family](seed))


EVALUATION_PROMPTS = [f"a handwritten {w}" for w in (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"
)]  # fmt: skip
"""The evaluation prompts the tiny text pipelines' accel.json names (the shipped text teachers')."""


def write_pipeline(family: str, path, seed: int = 0, evaluation: bool = True) -> pathlib.Path:
    """Build ``family`` and ``save_pretrained`` it (safetensors) into ``path``; returns the path.
    A text family's gets an accel.json naming ``EVALUATION_PROMPTS`` (``evaluation``), as a
    shipped teacher's does, for its calibration and quality gates."""
    from accel.core.model_info import Evaluation, ModelInfo

    path = pathlib.Path(path)
    build_pipeline(family, seed).save_pretrained(path, safe_serialization=True)
    if evaluation and family != "dit":
        ModelInfo(evaluation=Evaluation(prompts=EVALUATION_PROMPTS)).write(path)
    return path


def pipelines(root: pathlib.Path):
    """``get(family)``: the family's tiny pipeline written under ``root`` on first use (a
    module-scoped fixture's cache)."""
    made: dict[str, pathlib.Path] = {}

    def get(family: str) -> pathlib.Path:
        if family not in made:
            made[family] = write_pipeline(family, root / family)
        return made[family]

    return get


def load_kwargs(family: str) -> dict:
    """Extra ``from_pretrained`` kwargs a saved ``family`` pipeline needs to load.

    SD3 without T5: ``save_pretrained`` writes ``text_encoder_3``/``tokenizer_3`` as ``[null, null]``
    but ``from_pretrained`` drops null entries of non-optional components and then refuses to build
    the pipeline unless they are passed as ``None`` (the documented way to load SD3 without T5).
    """
    _check(family)
    return {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}


def load_pipeline(family: str, path):
    """``DiffusionPipeline.from_pretrained(path, **load_kwargs(family))``, eval, progress bar off."""
    from diffusers import DiffusionPipeline

    return prepare(DiffusionPipeline.from_pretrained(path, **load_kwargs(family)))
