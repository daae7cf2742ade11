"""Train the shipped text-to-image teacher; writes accel/assets/text_teacher/ (a diffusers directory).

    python -m accel.assets.make_text_teacher [--vae-steps 1000] [--steps 8000] [--stop-at 6000]
        [--threads 1]

A Stable Diffusion 1.x pipeline in miniature: ``StableDiffusionPipeline`` with an
``AutoencoderKL`` (1 channel, 32x32 pixels to 4x8x8 latents), a ``CLIPTextModel`` (2 layers,
width 64) behind a ``CLIPTokenizerFast`` built offline (byte-level BPE over the 256 byte symbols
with merges that make each word of ``PROMPT_WORDS`` one token), a cross-attention
``UNet2DConditionModel`` and a ``DDIMScheduler`` with Stable Diffusion's scaled-linear betas and
epsilon prediction. ``StableDiffusionPipeline.from_pretrained(dir)("a handwritten seven")`` draws
a seven.

Data: scikit-learn's 1797 digits (``accel.demo.digits.digits_dataset``, 16x16) upsampled
bilinearly to 32x32; each image gets a caption drawn from ``TEMPLATES`` for its label.

Training, in two phases (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"):

1. the autoencoder: L1 + MSE reconstruction with a KL weight of 1e-4 (the paper's KL-reg VAE,
   without its perceptual and patch-GAN terms, which need networks we cannot download);
   ``scaling_factor`` is then set to 1 / std of the posterior means, as the paper does for SD.
2. the UNet and the text encoder jointly (the text encoder is trained, not a frozen CLIP: there is
   no pre-trained CLIP here), epsilon-prediction MSE on posterior samples of the frozen VAE, the
   caption dropped to "" with probability 0.1 for classifier-free guidance (Ho & Salimans 2022).
   The shipped UNet and text encoder are the EMA.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from accel.core.model_info import Evaluation, ModelInfo
from accel.demo.digits import ASSETS, DIGIT_WORDS, TEMPLATES, caption, digits_dataset

TEXT_TEACHER_DIR = ASSETS / "text_teacher"
RESOLUTION = 32
MAX_LENGTH = 16  # the tokenizer's model_max_length and the text encoder's positions

PROMPT_WORDS = (
    *DIGIT_WORDS,
    *"a an the of by digit number handwritten drawing written hand image".split(),
)
DDIM_SD = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,  # unused by trailing spacing; 1 silences diffusers' warning
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}


def clip_tokenizer(words=PROMPT_WORDS, model_max_length: int = MAX_LENGTH):
    """CLIP's byte-level BPE built offline: the 256 byte symbols and their end-of-word forms, BOS,
    EOS, plus left-to-right merges that make each of ``words`` a single token. Any text tokenizes
    (unknown words fall back to bytes); lower-cased and whitespace-normalised like CLIP's."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import CLIPTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        pieces = [*word[:-1], word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left += right
            if left not in tokens:
                tokens.append(left)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token="<|endoftext|>",
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", vocab["<|endoftext|>"]),
        ("<|startoftext|>", vocab["<|startoftext|>"]),
        trim_offsets=False,
        add_prefix_space=False,
    )
    return CLIPTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=MAX_LENGTH,
            projection_dim=64,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),  # 3 blocks: 32x32 pixels -> 8x8 latents
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RESOLUTION,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # Cross-attention at 4x4 (and in the mid block): the prompt picks the digit's shape.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def images() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits at 32x32 in [-1, 1] (N x 1 x 32 x 32) and their labels."""
    x, y = digits_dataset()
    return nn.functional.interpolate(x, size=RESOLUTION, mode="bilinear", align_corners=False), y


def cosine_lr(opt, steps: int, warmup: int = 200):
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        ),
    )


def train_vae(x: torch.Tensor, steps: int, batch: int, log: list) -> nn.Module:
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched, t0 = cosine_lr(opt, steps), time.time()
    for step in range(1, steps + 1):
        x0 = x[torch.randint(0, len(x), (batch,))]
        posterior = vae.encode(x0).latent_dist
        rec = vae.decode(posterior.sample()).sample
        loss = (
            (rec - x0).abs().mean()
            + nn.functional.mse_loss(rec, x0)
            + 1e-4 * posterior.kl().mean() / x0[0].numel()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log.append({"step": step, "loss": loss.item()})
            print(f"vae step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        std = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(256)]).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae


def save(out: Path, vae, text_encoder, tokenizer, unet, info: dict) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**DDIM_SD),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    write_pipeline(pipe, out, info)


EVALUATION = Evaluation("fd_digits", [caption(k) for k in range(10)])
"""How the digits text teachers' images are judged: FD-digits, drawn from the test prompt of each
digit in order ("a handwritten zero" ... "nine"), so a prompt's index is its digit."""


def write_pipeline(pipe, out: Path, info: dict) -> None:
    """``pipe`` saved (safetensors) with its training record into ``out``, which is replaced only
    once the whole directory is written (``out.incomplete`` first, then a rename)."""
    tmp = out.with_name(out.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    ModelInfo(training=info, evaluation=EVALUATION).write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def sample_latents(posterior: torch.Tensor, idx: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scaled samples of the cached VAE posteriors (mean and log-variance stacked) at ``idx``."""
    mean, logvar = posterior[idx].chunk(2, dim=1)
    return (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean)) * scaling


@torch.no_grad()
def ema_update(pairs, step: int, decay: float) -> None:
    """EMA of each (ema, model) pair's parameters, with the usual warm-up of the decay."""
    d = min(decay, (1 + step) / (10 + step))
    for ema, model in pairs:
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1 - d)


def training_arguments(description: str, out: Path, steps: int = 8000) -> argparse.ArgumentParser:
    """The options the latent teachers' training scripts share."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop after this step (the schedule keeps --steps)",
    )
    p.add_argument("--out", type=Path, default=out)
    return p


def main() -> None:
    p = training_arguments(__doc__.splitlines()[0], TEXT_TEACHER_DIR)
    p.add_argument("--vae-steps", type=int, default=1000)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler

    from distill.schedule import Schedule

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    x, y = images()
    vae_log: list = []
    vae = train_vae(x, args.vae_steps, 32, vae_log)
    with torch.no_grad():
        posterior = torch.cat([vae.encode(c).latent_dist.parameters for c in x.split(256)])
    tokenizer = clip_tokenizer()
    text_encoder, unet = build_text_encoder(tokenizer), build_unet()
    sizes = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (vae, text_encoder, unet)]
    print("parameters (M): vae {:.2f} text {:.2f} unet {:.2f}".format(*sizes), flush=True)
    # Every caption of every label, tokenized once: ids[label, template] (MAX_LENGTH ids each).
    ids = torch.stack(
        [
            tokenizer(
                [caption(d, t) for t in range(len(TEMPLATES))],
                padding="max_length",
                max_length=MAX_LENGTH,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for d in range(10)
        ]
    )
    null_ids = tokenizer(
        "", padding="max_length", max_length=MAX_LENGTH, return_tensors="pt"
    ).input_ids
    schedule = Schedule.from_config(dict(DDIMScheduler(**DDIM_SD).config))
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema_unet, ema_text = (copy.deepcopy(m).requires_grad_(False) for m in (unet, text_encoder))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = cosine_lr(opt, args.steps)
    scaling = vae.config.scaling_factor
    log, t0, running = [], time.time(), 0.0

    def info() -> dict:
        return {
            "data": "sklearn digits, 16x16 upsampled to 32x32, captions from TEMPLATES",
            "vae_steps": args.vae_steps,
            "vae_loss_log": vae_log,
            "steps": args.steps,
            "stopped_at": args.stop_at,
            "batch": args.batch,
            "lr": args.lr,
            "seed": args.seed,
            "p_uncond": args.p_uncond,
            "ema": args.ema,
            "loss_log": log,
        }

    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch,))
        z0 = sample_latents(posterior, idx, scaling)
        templates = torch.tensor([rng.randrange(len(TEMPLATES)) for _ in range(args.batch)])
        tokens = ids[y[idx], templates]
        tokens[torch.rand(args.batch) < args.p_uncond] = null_ids[0]
        t = torch.randint(0, schedule.num_train_timesteps, (args.batch,))
        eps = torch.randn_like(z0)
        alpha, sigma = (v.float().view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
        context = text_encoder(tokens).last_hidden_state
        pred = unet(alpha * z0 + sigma * eps, t, encoder_hidden_states=context).sample
        loss = nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(((ema_unet, unet), (ema_text, text_encoder)), step, args.ema)
        running += loss.item()
        if step % 100 == 0:
            log.append({"step": step, "loss": running / 100})
            print(f"step {step} loss {running / 100:.4f} {time.time() - t0:.0f}s", flush=True)
            running = 0.0
        last = step == (args.stop_at or args.steps)
        if step % 2000 == 0 or last:
            save(args.out, vae, ema_text.eval(), tokenizer, ema_unet.eval(), info())
        if last:
            break
    (args.out / "training.json").write_text(json.dumps({"seconds": time.time() - t0}) + "\n")


if __name__ == "__main__":
    main()
