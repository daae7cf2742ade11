"""Train the shipped flow-matching teacher; writes accel/assets/flow_teacher/ (a diffusers directory).

    python -m accel.assets.make_flow_teacher [--steps 8000] [--stop-at 6000] [--threads 1]

Stable Diffusion 3 in miniature: ``StableDiffusion3Pipeline`` with an ``SD3Transformer2DModel``
(MM-DiT, patch size 1 over 4x8x8 latents), ``FlowMatchEulerDiscreteScheduler`` (SD3's shift 3.0),
and, as the text-to-image teacher ships them (``accel.assets.make_text_teacher``), its
``AutoencoderKL`` (with ``shift_factor`` 0, which SD3's pipeline reads) and its CLIP text
encoder and tokenizer, frozen. SD3 reads two CLIP encoders with projections: both are the text
teacher's encoder as a ``CLIPTextModelWithProjection`` (its weights, and a ``text_projection``
trained here, one per encoder); T5 is left out, as diffusers allows (``text_encoder_3=None``: the
pipeline appends ``max_sequence_length`` = 256 zero tokens, and the teacher is trained with them).
``StableDiffusion3Pipeline.from_pretrained(dir)("a handwritten seven")`` draws a seven.

Data: the 1797 digits upsampled to 32x32 with captions from ``TEMPLATES``, VAE posterior samples as
x0. Objective: rectified flow (Liu et al. 2022) as SD3 trains it (Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis", sec. 2-3): z_s = (1 - s) x0 +
s eps, the transformer regresses the velocity eps - x0 at timestep s * 1000 with s drawn from the
logit-normal lognorm(0, 1) (their best-ranked sampler), MSE; the caption dropped to "" with
probability 0.1 for classifier-free guidance. The shipped transformer and projections are the EMA.

Training computes exactly what the stock pipeline computes, 4x cheaper: the 256 zero T5 tokens
enter the transformer as one and the same token (``context_embedder``'s bias), and identical
tokens stay identical through every joint block (each token's attention and MLP see the same
inputs), so they are trained as one token whose key carries log(256) in the attention logits
(``RepeatedTokenAttention``: softmax over 256 copies of a key is softmax over one with its logit
raised by log 256). ``check_repeated_token_attention`` proves the two forwards equal before
training starts.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch
from torch import nn

from accel.assets.make_text_teacher import (
    TEXT_TEACHER_DIR,
    cosine_lr,
    ema_update,
    images,
    sample_latents,
    training_arguments,
    write_pipeline,
)
from accel.demo.digits import ASSETS, TEMPLATES, caption
from distill.models.sd3 import RepeatedTokenAttention

FLOW_TEACHER_DIR = ASSETS / "flow_teacher"
FLOW_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length: zeros without T5


def build_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=128,  # both CLIP encoders' hidden states (64 + 64)
        caption_projection_dim=64,
        pooled_projection_dim=128,  # both projected pooled outputs (64 + 64)
        pos_embed_max_size=8,
    )


def check_repeated_token_attention(transformer, clip_tokens: int) -> float:
    """Max difference between the stock forward with T5_TOKENS zero tokens and the compressed one
    with a single zero token and ``RepeatedTokenAttention``, at random inputs."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    h = torch.randn(2, clip_tokens, 128, generator=g)
    pooled = torch.randn(2, 128, generator=g)
    t = torch.tensor([300.0, 900.0])
    with torch.no_grad():
        transformer.set_attn_processor(JointAttnProcessor2_0())
        full = torch.cat([h, torch.zeros(2, T5_TOKENS, 128)], 1)
        ref = transformer(hidden_states=z, timestep=t, encoder_hidden_states=full,
                          pooled_projections=pooled).sample  # fmt: skip
        transformer.set_attn_processor(RepeatedTokenAttention(T5_TOKENS))
        short = torch.cat([h, torch.zeros(2, 1, 128)], 1)
        out = transformer(hidden_states=z, timestep=t, encoder_hidden_states=short,
                          pooled_projections=pooled).sample  # fmt: skip
    return float((out - ref).abs().max())


def text_encoders():
    """The text teacher's tokenizer and its CLIP encoder twice, as CLIPTextModelWithProjection."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast

    tokenizer = CLIPTokenizerFast.from_pretrained(TEXT_TEACHER_DIR / "tokenizer")
    torch.manual_seed(0)
    encoders = [
        CLIPTextModelWithProjection.from_pretrained(TEXT_TEACHER_DIR / "text_encoder")
        for _ in range(2)
    ]
    for e in encoders:
        nn.init.normal_(e.text_projection.weight, std=64**-0.5)
        e.eval().requires_grad_(False)
    return tokenizer, encoders


def conditioning(tokenizer, encoders, prompts: list[str]):
    """(penultimate hidden states of both encoders concatenated, pre-projection pooled outputs of
    both), as StableDiffusion3Pipeline reads them; the projections are applied in training."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids  # fmt: skip
    hidden, pooled = [], []
    with torch.no_grad():
        for e in encoders:
            out = e.text_model(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.pooler_output)
    return torch.cat(hidden, -1), torch.stack(pooled)  # (N, L, 128), (2, N, 64)


def save(out: Path, vae, tokenizer, encoders, transformer, info: dict) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    transformer = copy.deepcopy(transformer)
    transformer.set_attn_processor(JointAttnProcessor2_0())  # the stock forward

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    write_pipeline(pipe, out, info)


def main() -> None:
    p = training_arguments(__doc__.splitlines()[0], FLOW_TEACHER_DIR)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    x, y = images()
    vae = AutoencoderKL.from_pretrained(TEXT_TEACHER_DIR / "vae").eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline adds it when decoding
    with torch.no_grad():
        posterior = torch.cat([vae.encode(c).latent_dist.parameters for c in x.split(256)])
    scaling = vae.config.scaling_factor
    tokenizer, encoders = text_encoders()
    # every caption of every label, encoded once: hidden[label, template], pooled[.., label, template]
    prompts = [caption(d, t) for d in range(10) for t in range(len(TEMPLATES))]
    hidden, pooled = conditioning(tokenizer, encoders, prompts)
    hidden = hidden.view(10, len(TEMPLATES), *hidden.shape[1:])
    pooled = pooled.view(2, 10, len(TEMPLATES), -1)
    null_hidden, null_pooled = conditioning(tokenizer, encoders, [""])
    transformer = build_transformer()
    diff = check_repeated_token_attention(transformer, hidden.shape[-2])
    assert diff < 1e-4, f"the compressed T5 block differs from the stock forward by {diff}"
    print(f"compressed T5 block: max difference {diff:.1e} from the stock forward")
    projections = nn.ModuleList([e.text_projection for e in encoders]).requires_grad_(True)
    print(f"transformer {sum(q.numel() for q in transformer.parameters()) / 1e6:.2f}M parameters")
    params = [*transformer.parameters(), *projections.parameters()]
    ema_transformer, ema_projections = (
        copy.deepcopy(m).requires_grad_(False) for m in (transformer, projections)
    )
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = cosine_lr(opt, args.steps)
    t5_token = torch.zeros(args.batch, 1, hidden.shape[-1])  # T5_TOKENS copies, in the logits
    log, t0, running = [], time.time(), 0.0

    def info() -> dict:
        return {
            "data": "sklearn digits, 16x16 upsampled to 32x32, captions from TEMPLATES",
            "objective": "rectified flow, velocity MSE, logit-normal(0, 1) timesteps",
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
        x0 = sample_latents(posterior, idx, scaling)
        templates = torch.tensor([rng.randrange(len(TEMPLATES)) for _ in range(args.batch)])
        h, pl = hidden[y[idx], templates], pooled[:, y[idx], templates]
        drop = torch.rand(args.batch) < args.p_uncond
        h = torch.where(drop[:, None, None], null_hidden, h)
        pl = torch.where(drop[None, :, None], null_pooled, pl)
        pooled_projections = torch.cat([proj(pl[i]) for i, proj in enumerate(projections)], -1)
        s = torch.sigmoid(torch.randn(args.batch))  # logit-normal(0, 1)
        eps = torch.randn_like(x0)
        z = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        pred = transformer(
            hidden_states=z,
            timestep=s * 1000,
            encoder_hidden_states=torch.cat([h, t5_token], 1),
            pooled_projections=pooled_projections,
        ).sample
        loss = nn.functional.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(((ema_transformer, transformer), (ema_projections, projections)), step, args.ema)
        running += loss.item()
        if step % 100 == 0:
            log.append({"step": step, "loss": running / 100})
            print(f"step {step} loss {running / 100:.4f} {time.time() - t0:.0f}s", flush=True)
            running = 0.0
        last = step == (args.stop_at or args.steps)
        if step % 2000 == 0 or last:
            shipped = [copy.deepcopy(e) for e in encoders]  # with the EMA projections
            for e, proj in zip(shipped, ema_projections, strict=True):
                e.text_projection.load_state_dict(proj.state_dict())
            save(args.out, vae, tokenizer, shipped, ema_transformer.eval(), info())
        if last:
            break
    (args.out / "training.json").write_text(json.dumps({"seconds": time.time() - t0}) + "\n")


if __name__ == "__main__":
    main()
