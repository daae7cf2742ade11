"""The shipped demo assets: the teacher is a stock diffusers pipeline that draws the digit it is
asked for, and the classifier behind FD-digits recognises real digits."""

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
