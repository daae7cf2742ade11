"""Train the shipped demo teacher; writes accel/assets/teacher/ (a diffusers directory).

    python -m accel.assets.make_teacher [--steps 4000]

A class-conditional UNet2DModel (1.16M parameters) on scikit-learn's digits at 16x16, one channel,
labels 0-9 plus a null label 10 for classifier-free guidance (Ho & Salimans 2022: the label is
dropped to the null label with probability 0.15). 1000-step DDPM training schedule with the cosine
betas of Nichol & Dhariwal 2021 and v-prediction (Salimans & Ho 2022, whose progressive distillation
needs a parameterisation that stays well-posed at SNR -> 0). The shipped weights are the EMA.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

from accel.core.model_info import Evaluation, ModelInfo
from accel.demo.digits import TEACHER_DIR, digits_dataset
from distill.schedule import Schedule

NULL_LABEL = 10


def build_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=NULL_LABEL + 1,
        norm_num_groups=16,
        attention_head_dim=32,
    )


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=False,
        timestep_spacing="trailing",
    )


def save(unet: UNet2DModel, log: list[dict], args: argparse.Namespace) -> None:
    TEACHER_DIR.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(TEACHER_DIR / "unet")
    build_scheduler().save_pretrained(TEACHER_DIR / "scheduler")
    (TEACHER_DIR / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "_diffusers_version": "0.42.1",
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            },
            indent=2,
        )
        + "\n"
    )
    ModelInfo(
        null_class_label=NULL_LABEL,
        num_classes=10,
        evaluation=Evaluation(metric="fd_digits"),
        training={
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "seed": args.seed,
            "p_uncond": args.p_uncond,
            "ema": args.ema,
            "loss_log": log,
        },
    ).write(TEACHER_DIR)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    x, y = digits_dataset()
    schedule = Schedule.from_config(dict(build_scheduler().config, _class_name="DDPMScheduler"))
    unet = build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1, (s + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
        ),
    )
    log, t0, running = [], time.time(), 0.0
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch,))
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(args.batch) < args.p_uncond] = NULL_LABEL
        t = torch.randint(0, schedule.num_train_timesteps, (args.batch,))
        eps = torch.randn_like(x0)
        alpha, sigma = (v.float().view(-1, 1, 1, 1) for v in schedule.alpha_sigma(t))
        v_target = alpha * eps - sigma * x0
        pred = unet(alpha * x0 + sigma * eps, t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(pred, v_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pu in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(pu, 1 - decay)
        running += loss.item()
        if step % 100 == 0:
            log.append({"step": step, "loss": running / 100})
            print(f"step {step} loss {running / 100:.4f} {time.time() - t0:.0f}s", flush=True)
            running = 0.0
        if step % 1000 == 0 or step == args.steps:
            save(ema, log, args)


if __name__ == "__main__":
    main()
