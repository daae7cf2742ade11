"""The quality gate of every quantize and compile stage.

A stage that changes arithmetic (INT8/FP8 quantization, an engine's fused kernels) samples end to end
with its output and with its parent, on the same noise and labels, and compares image quality. When
quality fell by more than the recipe allows, the stage raises ``StageError`` and, because the store
commits an artifact only after its stage returns, no engine is written.

Metrics: ``fd_digits`` (Fréchet distance on the digits classifier's features, ``accel.demo.digits``;
the threshold is the largest relative increase over the parent) for models that sample 1x16x16
digits or pipelines that draw digits (the text-to-image teacher's students: set it in the recipe),
and ``image_rmse`` for any model (RMS difference between the stage's and the parent's images from
the same noise, images in [-1, 1]; the threshold is that RMS). The default metric
comes from the model (``default_metric``): FD-digits for the digits models, image RMSE otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from accel.core.errors import StageError
from accel.core.plan import SamplerPlan
from accel.core.stage import StageConfig, say

DEFAULT_THRESHOLD = {"fd_digits": 0.05, "image_rmse": 0.05}
DIGITS_SHAPE = [1, 16, 16]


class GateConfig(StageConfig):
    metric: Literal["fd_digits", "image_rmse", "off"] | None = None
    """None: the model's own (``default_metric``)."""
    threshold: float | None = Field(None, ge=0)
    """fd_digits: largest relative FD increase over the parent (default 0.05: 5%);
    image_rmse: largest RMS image difference from the parent (default 0.05)."""
    samples: int = Field(1000, ge=2)
    """Images each side draws per seed, in batches of the target's batch (memory does not grow
    with it)."""
    seeds: list[Annotated[int, Field(ge=0)]] = Field([0], min_length=1)
    """Noise seeds; the gate compares the mean over them."""


def default_metric(plan: SamplerPlan) -> str:
    """FD-digits for the pixel-space digits models (1x16x16 samples), image RMSE for any other."""
    digits = plan.family == "unet2d" and list(plan.sample_shape) == DIGITS_SHAPE
    return "fd_digits" if digits else "image_rmse"


def quality_gate(
    stage: str,
    gate: GateConfig,
    parent: tuple,
    candidate: tuple,
    progress: Callable[[str], None] = say,
    batch: int = 64,
) -> dict:
    """Compare ``candidate`` = (runtime, plan) with ``parent`` = (runtime, plan), both drawn in
    batches of ``batch`` (``Target.draw_batch``) side by side, so that memory holds one batch
    of each and the FD features, whatever ``gate.samples`` is; the figures, or ``StageError``
    when the candidate is worse than ``gate`` allows."""
    from accel.demo.digits import Features, draw

    plan: SamplerPlan = parent[1]
    metric = gate.metric or default_metric(plan)
    if metric == "off":
        return {"metric": "off", "passed": True}
    # a pipeline's VAE decodes images that the digits classifier reads (gray or RGB, resized)
    if metric == "fd_digits" and list(plan.sample_shape) != DIGITS_SHAPE and not plan.components:
        raise StageError(
            stage,
            f"the quality gate's FD-digits needs 1x16x16 digit images, but this model samples "
            f'{"x".join(map(str, plan.sample_shape))}: set gate.metric = "image_rmse" '
            '(or "off") in the stage config',
        )
    threshold = DEFAULT_THRESHOLD[metric] if gate.threshold is None else gate.threshold
    progress(
        f"{stage}: quality gate ({metric}, {gate.samples} samples x {len(gate.seeds)}, "
        f"batches of {batch})"
    )
    sides = {"parent": parent, "candidate": candidate}
    scores: dict[str, list[dict]] = {"parent": [], "candidate": []}
    sq_err, count = 0.0, 0
    for seed in gate.seeds:
        streams = [
            draw(rt, p, gate.samples, seed, p.num_classes, batch) for rt, p in sides.values()
        ]
        features = {who: Features() for who in sides}
        for (a, labels), (b, _) in zip(*streams, strict=True):
            for who, images in (("parent", a), ("candidate", b)):
                if not np.isfinite(images).all():
                    raise StageError(stage, f"the {who} sampled NaN or Inf images")
                if metric == "fd_digits":
                    try:
                        features[who].add(images, labels)
                    except ValueError as e:  # images the classifier cannot read
                        raise StageError(
                            stage, f'{e}: set gate.metric = "image_rmse" in the stage config'
                        ) from None
            sq_err += float(((b - a) ** 2).sum())
            count += a.size
        if metric == "fd_digits":
            for who in sides:
                scores[who].append(features[who].evaluate())
    result: dict = {
        "metric": metric,
        "threshold": threshold,
        "samples": gate.samples,
        "seeds": list(gate.seeds),
        "batch": batch,
        "image_rmse": (sq_err / count) ** 0.5,
    }
    if metric == "fd_digits":
        for who, per_seed in scores.items():
            result[who] = {
                "fd_digits": float(np.mean([s["fd_digits"] for s in per_seed])),
                "class_accuracy": float(np.mean([s["class_accuracy"] for s in per_seed])),
            }
        before, after = result["parent"]["fd_digits"], result["candidate"]["fd_digits"]
        result["value"] = after / before - 1
        verdict = (
            f"FD-digits {after:.3f} against the parent's {before:.3f} "
            f"({result['value']:+.1%}, allowed +{threshold:.1%})"
        )
    else:
        result["value"] = result["image_rmse"]
        verdict = (
            f"image RMS difference from the parent {result['value']:.4f} (allowed {threshold})"
        )
    result["passed"] = bool(result["value"] <= threshold)
    progress(f"{stage}: quality gate {'passed' if result['passed'] else 'FAILED'}: {verdict}")
    if not result["passed"]:
        raise StageError(
            stage,
            f"quality gate failed: {verdict}; no artifact was written. Calibrate on more "
            "samples, quantize fewer op types, or raise gate.threshold if the loss is acceptable",
        )
    return result
