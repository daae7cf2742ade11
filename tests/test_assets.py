"""The shipped demo assets: the teacher is a stock diffusers pipeline that draws the digit it is
asked for, and the classifier behind FD-digits recognises real digits."""

import json

import numpy as np
from diffusers import DDPMScheduler, UNet2DModel

from accel.demo.digits import (
    TEACHER_DIR,
    digits_dataset,
    evaluate_images,
    features_and_predictions,
    generate,
)
from export.torch_runtime import open_model


def test_teacher_is_a_small_stock_diffusers_pipeline():
    size = sum(p.stat().st_size for p in TEACHER_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    unet = UNet2DModel.from_pretrained(TEACHER_DIR, subfolder="unet")
    assert unet.config.num_class_embeds == 11 and unet.config.sample_size == 16
    sched = DDPMScheduler.from_pretrained(TEACHER_DIR, subfolder="scheduler")
    assert (
        sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "v_prediction"
    )


def test_teacher_draws_the_requested_digits():
    runtime, plan = open_model(TEACHER_DIR, steps=10, guidance=1.5)
    images, labels = generate(runtime, plan, 60, seed=0, num_classes=10)
    assert images.shape == (60, 1, 16, 16)
    assert evaluate_images(images, labels)["class_accuracy"] >= 0.9


def test_classifier_recognises_real_digits():
    x, y = digits_dataset()
    _, pred = features_and_predictions(x.numpy())
    assert (pred == y.numpy()).mean() >= 0.98
    assert x.min() >= -1 and x.max() <= 1 and tuple(x.shape[1:]) == (1, 16, 16)
    assert np.isfinite(evaluate_images(x[:500].numpy(), y[:500].numpy())["fd_digits"])


def test_text_teacher_is_a_small_stock_stable_diffusion_pipeline():
    from accel.assets.make_text_teacher import TEXT_TEACHER_DIR

    size = sum(p.stat().st_size for p in TEXT_TEACHER_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    for folder in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (TEXT_TEACHER_DIR / folder).is_dir()
    assert not list(TEXT_TEACHER_DIR.rglob("*.bin"))  # safetensors only


def test_stock_pipeline_draws_the_prompted_digit():
    """``StableDiffusionPipeline.from_pretrained(dir)("a handwritten seven")``, at its defaults
    (50 steps, guidance 7.5) but for the seed, draws a seven (the digits classifier says so)."""
    from diffusers import StableDiffusionPipeline

    from accel.assets.make_text_teacher import TEXT_TEACHER_DIR

    _draws_the_prompted_digits(StableDiffusionPipeline.from_pretrained(TEXT_TEACHER_DIR))


def _draws_the_prompted_digits(pipe, digits=(7, 3, 0)):
    """``pipe`` at its defaults (seed 0) draws what the digits classifier calls each digit."""
    import torch

    from accel.demo.digits import caption

    pipe.set_progress_bar_config(disable=True)
    prompts = [caption(d) for d in digits]
    out = pipe(prompts, generator=torch.Generator().manual_seed(0), output_type="np").images
    images = out.transpose(0, 3, 1, 2) * 2 - 1  # N x 1 x 32 x 32 in [-1, 1]
    _, predicted = features_and_predictions(images)
    assert list(predicted) == list(digits)


def test_flow_teacher_is_a_small_stock_sd3_pipeline():
    from accel.assets.make_flow_teacher import FLOW_TEACHER_DIR

    size = sum(p.stat().st_size for p in FLOW_TEACHER_DIR.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    index = json.loads((FLOW_TEACHER_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder_3"] == [None, None]  # T5 left out
    assert not list(FLOW_TEACHER_DIR.rglob("*.bin"))  # safetensors only


def test_stock_sd3_pipeline_draws_the_prompted_digit():
    """``StableDiffusion3Pipeline.from_pretrained(dir, text_encoder_3=None, tokenizer_3=None)``
    ("a handwritten seven"), at its defaults (28 steps, guidance 7.0, 256 zero T5 tokens) but for
    the seed, draws a seven. (diffusers 0.42 loads a T5-less SD3 directory only with those two
    arguments, its documented way; without them from_pretrained refuses the directory.)"""
    from diffusers import StableDiffusion3Pipeline

    from accel.assets.make_flow_teacher import FLOW_TEACHER_DIR

    _draws_the_prompted_digits(
        StableDiffusion3Pipeline.from_pretrained(
            FLOW_TEACHER_DIR, text_encoder_3=None, tokenizer_3=None
        )
    )
