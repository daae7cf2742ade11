"""The model adapter: everything that differs between diffusers families, behind one interface.

A family's adapter knows its pipeline directory (which folder holds the denoiser, which text
encoders, tokenizers and VAE sit beside it), the shape of its latents for a resolution (in the layout
its stock pipeline takes as ``latents=``), its time convention (integer DDPM timesteps, or flow
timesteps sigma * T as diffusers' FlowMatch schedulers count them) and the backbone's own time scale,
its prediction type, and its conditioning: a dict of named tensors described by a
``ConditioningSpec``, built from prompts or class labels by ``encode`` and consumed by ``forward``.
Samplers, losses and graphs see only ``(x, t, cond)``; nothing outside ``distill.models`` names
``encoder_hidden_states`` or ``pooled_projections``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from accel.core.errors import CheckpointError
from distill.schedule import Schedule, is_flow


@dataclass(frozen=True)
class TensorSpec:
    """One conditioning input: its axes by name (``batch``, ``sequence``) or fixed size, and dtype.
    Inputs whose first axis is ``batch`` are per-example; the others (Flux's position ids) are
    shared by the whole batch."""

    axes: tuple[str | int, ...]
    dtype: str = "float32"

    @property
    def batched(self) -> bool:
        return bool(self.axes) and self.axes[0] == "batch"

    def to_json(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "dtype": self.dtype}


ConditioningSpec = dict[str, TensorSpec]


def concat_conditioning(
    spec: ConditioningSpec, cond: dict[str, torch.Tensor], null: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The conditioning of a doubled classifier-free-guidance batch: each per-example input
    followed by the null conditioning (broadcast from batch 1); shared inputs unchanged."""
    out = {}
    for name, value in cond.items():
        if name not in spec:  # a student's input its teacher does not take (an LCM w embedding)
            continue
        if spec[name].batched:
            other = null[name].to(value.device)
            out[name] = torch.cat([value, other.expand(len(value), *other.shape[1:])])
        else:
            out[name] = value
    return out


def _quiet_loading() -> None:
    """No progress bars or advisory chatter on stderr: the CLI's errors are one line."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _finite(module: nn.Module, where: Path) -> None:
    bad = [
        n
        for n, p in module.state_dict().items()
        if p.is_floating_point() and not torch.isfinite(p).all()
    ]
    if bad:
        raise CheckpointError(f"{where} holds NaN or Inf weights in {', '.join(bad[:3])}")


CAPABILITIES = {
    "training_data": "training data accel makes for it (labelled or captioned images)",
    "flow": "a flow-matching teacher",
    "w_input": "a w input that the stock pipeline feeds (without one, bake the guidance into a "
    "step-distilled student instead: progressive or consistency with guidance_scale)",
    "fused_sampler": "a fused torch sampler",
    "pixel": "a pixel-space model (no text encoder or VAE)",
}
"""What a model can do that a stage may require (``Stage.requires``), in the words of a refusal:
"it needs ..."."""


class ModelAdapter:
    """Base of the family adapters (one module per family in ``distill.models``).

    Subclasses set ``family`` (the user-facing name), ``denoiser_folder`` and ``components`` (the
    folders besides the denoiser that sampling needs) and implement ``latent_shape``,
    ``conditioning_spec``, ``encode``, ``forward`` and, for latent models, ``decode``."""

    family: ClassVar[str]
    denoiser_folder: ClassVar[str] = "transformer"
    components: ClassVar[tuple[str, ...]] = ()
    optional_components: ClassVar[tuple[str, ...]] = ()
    conditioning: ClassVar[str] = "text"  # "text", "class" or "none": what encode() takes
    guidance_in_model: ClassVar[bool] = False  # w is a model input (Flux-dev), not two passes
    w_inputs: ClassVar[tuple[str, ...]] = ()  # conditioning that carries w, not the prompt
    resolution: tuple[int, int] | None = None  # (H, W) being sampled, set by the runtime
    training_data: ClassVar[bool] = True  # distill.data makes its training data
    fused_sampler: ClassVar[bool] = True  # its sampler fuses into one torch graph (torch_compile)
    pixel: ClassVar[bool] = False  # samples pixels: no text encoder, no VAE
    null_from_info: ClassVar[bool] = False  # the unconditional branch of guidance is the
    # checkpoint's null class (accel.json's null_class_label), not null_conditioning's
    export_max_batch: ClassVar[int] = 1024
    """The largest batch the denoiser's dynamo export proves (its guards' bound)."""
    lora_targets: ClassVar[tuple[str, ...]] = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
        "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )  # fmt: skip
    """The layers a LoRA student adapts (peft ``target_modules``, name suffixes): a transformer's
    attention projections and MLPs, as diffusers' LoRA training scripts for SD3, Flux and Sana
    target them."""

    def __init__(
        self,
        root: Path,
        backbone: nn.Module,
        scheduler_config: dict[str, Any],
        index: dict[str, Any],
        load_components: bool = True,
    ) -> None:
        self.root = root
        self.backbone = backbone
        self.config = backbone.config
        self.scheduler_config = scheduler_config
        self.index = index
        self.modules: dict[str, Any] = {}
        if load_components:
            for name in self.components:
                self.modules[name] = self._load(name, required=True)
            for name in self.optional_components:
                self.modules[name] = self._load(name, required=False)
            self.check_components()

    @classmethod
    def family_of(cls, config: dict[str, Any]) -> str:
        """The family name of a denoiser config, without loading anything."""
        return cls.family

    @classmethod
    def capabilities_of(cls, scheduler_config: dict[str, Any]) -> frozenset[str]:
        """What a checkpoint of this family with this scheduler can do (``CAPABILITIES``), from
        configs alone: stages ask for capabilities, never for family names."""
        caps = {name for name in ("training_data", "fused_sampler", "pixel") if getattr(cls, name)}
        if is_flow(scheduler_config):
            caps.add("flow")
        # a pixel model's w is a row of its label table (distill.guidance); a latent family's, the
        # input its stock few-step pipeline feeds (with_guidance_input)
        if cls.pixel or cls.with_guidance_input is not ModelAdapter.with_guidance_input:
            caps.add("w_input")
        return frozenset(caps)

    # ------------------------------------------------------------------ loading

    def _load(self, name: str, required: bool) -> Any:
        entry = self.index.get(name)
        if entry is None or entry == [None, None] or entry[0] is None:
            if required:
                raise CheckpointError(
                    f"{self.root}: the {self.family} pipeline needs a {name!r} component, and "
                    "model_index.json lists none"
                )
            return None
        folder = self.root / name
        if not folder.is_dir():
            raise CheckpointError(
                f"{self.root}: component folder {name}/ is missing (model_index.json lists "
                f"{name} as {entry[1]}); copy the whole pipeline directory"
            )
        library, cls_name = entry
        _quiet_loading()
        try:
            cls = getattr(importlib.import_module(library), cls_name)
        except (ImportError, AttributeError):
            raise CheckpointError(
                f"{folder}: model_index.json names {library}.{cls_name}, which is not installed"
            ) from None
        if name.startswith("tokenizer"):
            kwargs: dict[str, Any] = {"local_files_only": True}
        else:  # float32 whatever the files hold (transformers 5 keeps an fp16 checkpoint
            # fp16): the exporters trace float32 graphs, and an fp16 VAE overflows (SDXL's)
            kwargs = {
                "local_files_only": True,
                "use_safetensors": True,
                "torch_dtype": torch.float32,
            }
        try:
            module = cls.from_pretrained(str(folder), **kwargs)
        except Exception as e:  # each library raises its own types for missing/corrupt files
            msg = " ".join(str(e).strip().split())[:300]
            raise CheckpointError(f"{folder} does not load as {cls_name}: {msg}") from None
        if isinstance(module, nn.Module):
            _finite(module, folder)
            module.eval().requires_grad_(False)
        return module

    def check_components(self) -> None:
        """Every tokenizer must fit its text encoder: ids beyond the encoder's vocabulary would
        index outside its embedding table."""
        for tok_name in [n for n in self.modules if n.startswith("tokenizer")]:
            enc_name = "text_encoder" + tok_name[len("tokenizer") :]
            tok, enc = self.modules.get(tok_name), self.modules.get(enc_name)
            if tok is None or enc is None:
                continue
            vocab = getattr(enc.config, "vocab_size", None)
            if vocab is not None and len(tok) > vocab:
                raise CheckpointError(
                    f"{self.root}: {tok_name}/ has {len(tok)} tokens but {enc_name}/ embeds only "
                    f"{vocab}; the tokenizer does not belong to this text encoder"
                )

    # ------------------------------------------------------------------ the family's facts

    @property
    def schedule(self) -> Schedule:
        return Schedule.from_config(self.scheduler_config)

    @property
    def prediction_type(self) -> str:
        if self.schedule.kind == "flow":
            return "flow"
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def vae_scale_factor(self) -> int:
        vae = self.modules.get("vae")
        if vae is None:
            return 1
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def default_resolution(self) -> tuple[int, int]:
        size = self.config.sample_size
        h, w = size if isinstance(size, (list, tuple)) else (size, size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def check_resolution(self, height: int, width: int) -> None:
        k = self.vae_scale_factor * self.patch_size
        if height % k or width % k or height <= 0 or width <= 0:
            raise CheckpointError(
                f"{self.family} draws images whose height and width are multiples of {k}; "
                f"got {height}x{width}"
            )

    @property
    def patch_size(self) -> int:
        """The transformer's patch size (1 for UNets)."""
        return int(self.config.get("patch_size") or 1)

    def latent_shape(self, height: int, width: int) -> list[int]:
        """Per-example shape of the noise, as the stock pipeline takes ``latents=``."""
        k = self.vae_scale_factor
        return [self.config.in_channels, height // k, width // k]

    def conditioning_spec(self) -> ConditioningSpec:
        raise NotImplementedError

    def timestep_grid(self, steps: int, height: int, width: int) -> list[float]:
        """Flow models: the ``steps + 1`` timesteps (sigma * T, the last 0) that the family's stock
        pipeline steps through, from its scheduler's own ``set_timesteps``."""
        import diffusers

        cls = getattr(diffusers, self.scheduler_config["_class_name"])
        sched = cls.from_config(self.scheduler_config)
        sched.set_timesteps(steps, **self.timestep_kwargs(steps, height, width))
        T = self.schedule.num_train_timesteps
        return [float(s) * T for s in sched.sigmas.double().tolist()]

    def timestep_kwargs(self, steps: int, height: int, width: int) -> dict[str, Any]:
        """What the family's stock pipeline passes its scheduler's ``set_timesteps`` besides the
        step count (Flux: its sigmas; a dynamic shift's ``mu``)."""
        return {}

    def flow_shift(self, steps: int, height: int, width: int) -> dict[str, float] | None:
        """The shift a flow model's timesteps at this resolution are resolved with, as the
        sampler plan records it: {"mu": m} for a dynamic (resolution-dependent) shift, {"shift":
        s} for a static one; None for discrete schedules."""
        if self.schedule.kind != "flow":
            return None
        mu = self.timestep_kwargs(steps, height, width).get("mu")
        if mu is not None:
            return {"mu": float(mu)}
        cfg = self.scheduler_config
        return {"shift": float(cfg.get("shift", cfg.get("flow_shift", 1.0)))}

    # ------------------------------------------------------------------ conditioning

    def encode(
        self,
        prompts: list[str] | None = None,
        labels: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning: for text models the text path (``tokenize``, then
        ``encode_tokens``) and the prompt-independent inputs at ``height`` x ``width``."""
        if not self.tokenizer_names:
            raise NotImplementedError
        if prompts is None:
            raise CheckpointError(f"{self.family} models are conditioned on prompts: give --prompt")
        h, w = (height, width) if height else self.default_resolution()
        return {
            **self.encode_tokens(self.tokenize(prompts)),
            **self.static_conditioning(len(prompts), h, w),
        }

    # The text path as the exporters see it (``export.pipeline_export``): tokenizers, then a
    # graph from token ids to the prompt-dependent conditioning, then prompt-independent inputs.
    tokenizer_names: ClassVar[tuple[str, ...]] = ()
    """The tokenizers whose ids ``encode_tokens`` takes, in order (empty: no text export yet)."""

    normalize_prompts: ClassVar[bool] = False
    """``tokenize`` lower-cases and strips prompts (PixArt, Sana, as their pipelines do without
    bs4), then prepends ``prompt_prefix`` (Sana's instruction); the exported plan's tokenizer
    entries say so (``lowercase``, ``prefix``) and the runtime does the same."""
    prompt_prefix: str = ""

    def prepare_export(self, backbone: nn.Module) -> None:
        """Make ``backbone`` exportable without changing what it computes (PixArt's squeeze)."""

    def token_length(self, name: str) -> int:
        """The length the pipeline pads tokenizer ``name``'s ids to (its ``model_max_length``;
        T5 and Gemma: the pipeline's ``max_sequence_length``)."""
        return int(self.modules[name].model_max_length)

    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """Token ids of ``prompts``, one tensor per tokenizer of ``tokenizer_names``, padded to
        ``token_length`` (longer prompts truncated, with a warning)."""
        return [
            token_ids(self.modules[name], prompts, self.token_length(name))
            for name in self.tokenizer_names
        ]

    def encode_tokens(self, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The prompt-dependent conditioning from ``tokenize``'s ids: what a text-encoder graph
        computes."""
        raise NotImplementedError

    def as_conditioning(self, cond: Any) -> dict[str, torch.Tensor]:
        """The conditioning dict of what a sampler or training loop passes as ``labels``: an
        ``encode`` output as it is (the pixel UNets also take a tensor of class labels)."""
        return cond or {}

    def student_index(self, backbone: nn.Module, scheduler_class: str) -> dict[str, Any]:
        """The ``model_index.json`` of a student of this pipeline (``backbone``, sampled with
        ``scheduler_class``): the teacher's, with the new scheduler and ``pipeline_class``; the
        components it lists besides the denoiser are the teacher's (``save_pipeline`` links them)."""
        index = dict(self.index, scheduler=["diffusers", scheduler_class])
        pipeline = self.pipeline_class(backbone, scheduler_class)
        return index if pipeline is None else {**index, "_class_name": pipeline}

    def pipeline_class(self, backbone: nn.Module, scheduler_class: str) -> str | None:
        """The stock pipeline class of a student of this pipeline (``backbone``) sampled with
        ``scheduler_class`` (the teacher's own by default)."""
        return self.index.get("_class_name")

    def training_conditioning(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-example text conditioning of ``encode``'s output, as training data keeps it:
        inputs shared by the batch (Flux's position ids) and w inputs are dropped (``forward``
        derives them, as the stock pipeline does)."""
        spec = self.conditioning_spec()
        return {
            k: v
            for k, v in cond.items()
            if (k not in spec or spec[k].batched) and k not in self.w_inputs
        }

    def static_conditioning(self, n: int, height: int, width: int) -> dict[str, torch.Tensor]:
        """The conditioning that does not depend on the prompt (SDXL's size micro-conditions, an
        LCM student's w embedding), batch ``n``."""
        return {}

    def null_conditioning(self, height: int, width: int) -> dict[str, torch.Tensor] | None:
        """The conditioning of the unconditional branch of classifier-free guidance, batch 1;
        default: the empty prompt's."""
        return self.encode([""], height=height, width=width)

    def guidance_conditioning(self, w: float, n: int) -> dict[str, torch.Tensor]:
        """Inputs that carry w into a guidance-embedding model (Flux-dev)."""
        return {}

    def with_guidance_input(self, backbone: nn.Module) -> nn.Module | None:
        """A copy of ``backbone`` that takes w as the input the family's stock few-step pipeline
        feeds it (SD/SDXL: LCM's ``time_cond_proj_dim``), computing what ``backbone`` computes
        until trained; None where the family has no such input."""
        return None

    def guidance_inputs(
        self, backbone: nn.Module, w: float | torch.Tensor, n: int
    ) -> dict[str, torch.Tensor]:
        """The conditioning that carries w (one value, or one per example) into ``backbone`` (one
        made by ``with_guidance_input``), batch ``n``; empty for backbones without a w input."""
        return {}

    def forward(
        self, backbone: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``backbone``'s output (the family's denoiser, or a student of it) at schedule time ``t``
        (batch,), in the prediction type."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], N x C x H x W, from latents in ``latent_shape``'s layout."""
        vae = self.modules["vae"]
        z = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
        return vae.decode(z.to(next(vae.parameters()).dtype)).sample.float()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents in ``latent_shape``'s layout of images in [-1, 1] (the inverse of ``decode``):
        the VAE posterior's mean, shifted and scaled as the pipeline scales its latents."""
        vae = self.modules["vae"]
        z = vae.encode(images.to(next(vae.parameters()).dtype)).latent_dist.mean.float()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    def describe(self) -> str:
        return f"{self.family} ({type(self.backbone).__name__})"


def warn_truncated(tokenizer, prompts: list[str], max_length: int) -> None:
    """Say which prompts lose tokens to the encoder's limit (they are truncated, as the stock
    pipelines truncate them and log a warning)."""
    from accel.core.stage import say

    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    for prompt, n in zip(prompts, lengths, strict=True):
        if n > max_length:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            say(
                f"warning: the prompt {shown!r} is {n} tokens; the text encoder reads the first "
                f"{max_length} and the rest is dropped"
            )


def token_ids(tokenizer, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """``prompts`` as the CLIP-conditioned pipelines tokenize them: padded to ``max_length``
    (default: the tokenizer's ``model_max_length``), longer prompts truncated (with a warning)."""
    max_length = max_length or tokenizer.model_max_length
    warn_truncated(tokenizer, prompts, max_length)
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def text_hidden(encoder, tokenizer, prompts: list[str]):
    """``encoder``'s outputs (with hidden states) on ``prompts`` tokenized by ``token_ids``."""
    ids = token_ids(tokenizer, prompts)
    return encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)


def masked_encode(encoder, tokenizer, prompts: list[str], max_length: int):
    """Last hidden states and attention mask of ``prompts`` padded to ``max_length`` (T5, Gemma:
    the encoders whose pipelines pass the mask on to the transformer); longer prompts truncated,
    with a warning."""
    warn_truncated(tokenizer, prompts, max_length)
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    device = next(encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    return encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float(), mask
