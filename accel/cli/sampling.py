"""`accel sample`: images from a diffusers directory (torch eager), an engine or a bundle."""

from __future__ import annotations

import os
from pathlib import Path

import click

from accel.cli import (
    _resolution,
    cli,
    open_model_or_engine,
    size_options,
    source_options,
)
from accel.core.errors import RecipeError
from accel.core.hub import resolve_model


@cli.command()
@click.argument("model", metavar="MODEL_OR_ENGINE", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True,
              help="Text prompt (repeatable; cycled over the images) for text-to-image models.")  # fmt: skip
@click.option("--label", "labels", multiple=True, type=click.IntRange(min=0),
              help="Class label (repeatable; cycled) for class-conditional models; "
              "default: the classes cycled.")  # fmt: skip
@click.option("-n", "num", type=click.IntRange(min=1), default=None,
              help="Number of images (default: one per prompt or label).")  # fmt: skip
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Sampling steps (default: the student's own, or 50 for a teacher).",
)
@click.option(
    "--guidance",
    type=float,
    default=None,
    help="Classifier-free guidance scale (default: the model's; students have it baked in). "
    "For models with a guidance embedding (Flux-dev), the embedded guidance.",
)
@size_options
@source_options
@click.option(
    "--scheduler",
    type=click.Choice(["auto", "plan", "stock"]),
    default="auto",
    show_default=True,
    help="stock: a teacher's own scheduler loop, as its stock diffusers pipeline runs it (torch "
    "eager); plan: accel's sampler plan (DDIM, Euler, consistency), as engines run it; auto: "
    "stock for a teacher whose scheduler is deterministic, the plan for students, engines and "
    "teachers that ship a stochastic scheduler (DDPM).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the noise (numpy default_rng), as the quality gate draws it.",
)
@click.option(
    "--target",
    "target_name",
    default=None,
    help="Refuse an engine built for another target than this one.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Output .npz with images (N x C x H x W float32 in [0, 1]), the prompts or labels, and "
    "the initial noise as latents; or a .png grid of the images.",
)
def sample(
    model: Path,
    prompts: tuple[str, ...],
    labels: tuple[int, ...],
    num: int | None,
    steps: int | None,
    guidance: float | None,
    height: int | None,
    width: int | None,
    revision: str | None,
    variant: str | None,
    scheduler: str,
    seed: int,
    target_name: str | None,
    out: Path,
) -> None:
    """Sample images from a diffusers directory (torch eager) or an engine artifact (its runtime).

    The initial noise is numpy's default_rng(SEED).standard_normal in the layout the family's
    stock diffusers pipeline takes as its latents= argument (saved as `latents`), so that the
    stock pipeline given those latents draws the same images. Samplers: DDIM (trailing
    timesteps) for DDPM-family models, Euler on the flow ODE over the stock scheduler's sigmas
    for flow models, multistep consistency for consistency students."""
    import numpy as np

    from accel.core.target import load_target
    from accel.runtime import run_pipeline
    from accel.runtime.loop import check_finite
    from accel.runtime.pipeline import check_prompts

    if out.suffix not in (".npz", ".png"):
        raise click.BadParameter("name a .npz or a .png file", param_hint="--out")
    try:
        check_prompts(list(prompts))
    except ValueError as e:
        raise RecipeError(f"--prompt: {e}") from None
    target = load_target(target_name) if target_name else None
    resolution = _resolution(height, width)
    model = resolve_model(model, revision, variant)
    stock = None
    if scheduler == "auto":  # an engine or bundle runs its plan, and imports no torch
        from accel.runtime import artifact_kind

        scheduler = "plan"
        if artifact_kind(model) not in ("bundle", "engine"):
            from export.torch_runtime import StockScheduler

            scheduler = "stock" if StockScheduler.applies(model) else "plan"
    if scheduler == "stock":
        from accel.runtime import artifact_kind
        from export.torch_runtime import StockScheduler

        if artifact_kind(model) in ("bundle", "engine"):
            raise RecipeError(
                f"{model} is an engine: it runs its sampler plan; --scheduler stock samples a "
                "diffusers folder"
            )
        stock = StockScheduler(model, steps, guidance, resolution)
        runtime, plan = None, stock.plan
    else:
        runtime, plan = open_model_or_engine(model, target, steps, guidance, resolution=resolution)
    kind = plan.conditioning_kind or ("class" if plan.num_classes else None)
    if prompts and kind != "text":
        what = "class-conditional (give --label)" if kind == "class" else "not text-conditioned"
        raise RecipeError(f"{model} is {what}; it takes no --prompt")
    if labels and kind != "class":
        raise RecipeError(f"{model} is not class-conditional; it takes no --label")
    if kind == "text" and not prompts:
        raise RecipeError(f"{model} is a text-to-image model: give --prompt")
    if labels and plan.num_classes and max(labels) >= plan.num_classes:
        raise RecipeError(
            f"{model} has classes 0..{plan.num_classes - 1}; got --label {max(labels)}"
        )
    num = num or len(prompts) or len(labels) or None
    if num is None:
        raise RecipeError("how many images? give -n")
    noise = np.random.default_rng(seed).standard_normal((num, *plan.sample_shape))
    prompt_list = [prompts[i % len(prompts)] for i in range(num)] if prompts else None
    label_out = None
    if kind == "class":
        label_out = np.resize(np.asarray(labels or range(plan.num_classes), np.int64), num)
    # in batches of the target's largest (the default target's without --target), so that
    # memory follows the batch, not -n; one step-noise stream, as one batch would draw it
    batch = (target or load_target("cpu")).draw_batch
    step_noise = np.random.default_rng([seed, 1])

    def draw(i: int) -> np.ndarray:
        part = noise[i : i + batch].astype(np.float32)
        texts = None if prompt_list is None else prompt_list[i : i + batch]
        labs = None if label_out is None else label_out[i : i + batch]
        if stock is not None:
            return stock(part, texts, labs)
        return run_pipeline(runtime, plan, part, texts, labs, step_noise)

    images = np.concatenate([draw(i) for i in range(0, num, batch)])
    if not plan.decode:
        images = np.clip(images, -1, 1)
    check_finite(images, str(model))
    how = (
        f"{stock.scheduler_class.__name__}, {stock.steps} steps (the stock pipeline's loop)"
        if stock is not None
        else f"accel's {plan.sampler} plan, {len(plan.steps)} steps"
    )
    images01 = np.clip((images + 1) / 2, 0, 1).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        from accel.report import rgb_grid

        tmp = out.with_name(f".{out.name}.tmp.png")
        rgb_grid(images01).save(tmp)
    else:
        fields = {"images": images01, "latents": noise.astype(np.float32),
                  "scheduler": np.asarray(how)}  # fmt: skip
        if prompts:
            fields["prompts"] = np.asarray(prompt_list)
        fields["labels"] = (
            np.full(num, -1, np.int64) if label_out is None else label_out.astype(np.int64)
        )
        tmp = out.with_name(f".{out.name}.tmp.npz")
        np.savez(tmp, **fields)
    os.replace(tmp, out)
    click.echo(f"wrote {num} images {list(images.shape[1:])} to {out} ({how})")
