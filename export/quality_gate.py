"""The quality gate of every quantize and compile stage.

A stage that changes arithmetic (INT8/FP8 quantization, an engine's fused kernels) samples end to end
with its output and with its parent, on the same noise and conditions, and compares image quality.
When quality fell by more than the recipe allows, the stage raises ``StageError`` and, because the
store commits an artifact only after its stage returns, no engine is written.

The metric comes from the model: its ``accel.json`` names it (``evaluation.metric``, carried into
the sampler plan), a name in ``accel.registry.METRICS``: ``image_rmse`` (built in: the RMS
difference between the stage's and the parent's images from the same noise, images in [-1, 1];
the threshold is that RMS) or the digits demo's ``fd_digits`` (Fréchet distance on the digits
classifier's features; the threshold is the largest relative increase over the parent). A model
that names none is judged by image RMSE; ``gate.metric`` overrides. A text model draws from its
evaluation prompts (``accel.json``), or ``gate.prompts``; with neither it is refused.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field

from accel.core.errors import StageError
from accel.core.model_info import check_prompt_list
from accel.core.plan import SamplerPlan
from accel.core.stage import StageConfig, say
from accel.registry import METRICS, resolve

DEFAULT_METRIC = "image_rmse"


def _metric_name(name: str | None) -> str | None:
    if name is not None and name != "off" and name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; use one of {', '.join(METRICS)} or off")
    return name


def _prompt_list(prompts: list[str] | None) -> list[str] | None:
    check_prompt_list("prompts", prompts)
    return prompts


Prompts = Annotated[list[str] | None, AfterValidator(_prompt_list)]
"""A config's evaluation prompts (None: the model's, from its ``accel.json``)."""


class GateConfig(StageConfig):
    metric: Annotated[str | None, AfterValidator(_metric_name)] = None
    """A name in accel.registry.METRICS (image_rmse, fd_digits) or off; None: the model's own
    (its accel.json evaluation.metric; image_rmse when it names none)."""
    threshold: float | None = Field(None, ge=0)
    """fd_digits: largest relative FD increase over the parent (default 0.05: 5%);
    image_rmse: largest RMS image difference from the parent (default 0.05)."""
    samples: int = Field(1000, ge=2)
    """Images each side draws per seed, in batches of the target's batch (memory does not grow
    with it); a per-image metric stops earlier at ``max_seconds``."""
    max_seconds: float | None = Field(600.0, gt=0)
    """A per-image metric (image_rmse: each image against the parent's from the same noise)
    stops drawing after this many seconds, at least one batch and one image per seed in, so
    that a gate at real size (tens of seconds per image on a CPU) finishes; the images drawn
    are in the result. A distribution metric (fd_digits) needs its samples and draws them all.
    None: no limit."""
    seeds: list[Annotated[int, Field(ge=0)]] = Field([0], min_length=1)
    """Noise seeds; the gate compares the mean over them."""
    prompts: Prompts = None
    """Text models: the prompts both sides draw from, cycled; None: the model's evaluation
    prompts (its accel.json)."""


def default_metric(plan: SamplerPlan) -> str:
    """The model's own metric (its ``accel.json``, recorded in the plan), else image RMSE."""
    return plan.metric or DEFAULT_METRIC


def evaluation_prompts(
    stage: str, plan: SamplerPlan, prompts: list[str] | None, option: str
) -> list[str] | None:
    """The prompts a text model is drawn from (``prompts``, else the model's evaluation prompts);
    None for other models; a text model with neither is refused, naming ``option``."""
    if plan.conditioning_kind != "text":
        return None
    chosen = prompts or plan.evaluation_prompts
    if not chosen:
        raise StageError(
            stage,
            f"this text-to-image model names no evaluation prompts (accel.json "
            f'"evaluation": {{"prompts": [...]}}); give {option} = ["a prompt", ...] in the '
            "stage config, prompts like those it will serve",
        )
    return chosen


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
    of each and the metric's running figures, whatever ``gate.samples`` is; the figures, or
    ``StageError`` when the candidate is worse than ``gate`` allows."""
    from accel.core.metrics import ImageRMSE
    from accel.runtime import draw
    from accel.runtime.loop import bounded_batch

    plan: SamplerPlan = parent[1]
    name = gate.metric or default_metric(plan)
    if name == "off":
        return {"metric": "off", "passed": True}
    if name not in METRICS:
        raise StageError(
            stage,
            f"the model names the quality metric {name!r}, which accel does not have "
            f"({', '.join(METRICS)}); set gate.metric in the stage config",
        )
    prompts = evaluation_prompts(stage, plan, gate.prompts, "gate.prompts")
    rmse = ImageRMSE(plan)
    try:
        metric = rmse if name == DEFAULT_METRIC else resolve(METRICS[name])(plan)
    except ValueError as e:  # a metric that cannot read this model's images
        raise StageError(
            stage, f'{e}: set gate.metric = "image_rmse" (or "off") in the stage config'
        ) from None
    threshold = metric.default_threshold if gate.threshold is None else gate.threshold
    batch = bounded_batch(plan, batch)
    per_image = metric is rmse
    budget = gate.max_seconds if per_image and gate.max_seconds is not None else math.inf
    progress(
        f"{stage}: quality gate ({name}, {gate.samples} samples x {len(gate.seeds)}, "
        f"batches of {batch}" + (f", at most {budget:g} s" if budget < math.inf else "") + ")"
    )
    start, drawn, stopped = time.perf_counter(), 0, False  # drawn: images per side
    for k, seed in enumerate(gate.seeds):
        streams = [
            draw(rt, p, gate.samples, seed, batch, prompts, p.num_classes)
            for rt, p in (parent, candidate)
        ]
        for (a, conditions), (b, _) in zip(*streams, strict=True):
            drawn += len(a)
            for who, images in (("parent", a), ("candidate", b)):
                if not np.isfinite(images).all():
                    raise StageError(stage, f"the {who} sampled NaN or Inf images")
            if metric is not rmse:
                try:
                    metric.add(seed, a, b, conditions)
                except ValueError as e:  # images the metric cannot read
                    raise StageError(
                        stage, f'{e}: set gate.metric = "image_rmse" in the stage config'
                    ) from None
            rmse.add(seed, a, b, conditions)
            # each seed has an equal share of the time: seed k stops at (k + 1) / len(seeds)
            deadline = budget * (k + 1) / len(gate.seeds)
            if time.perf_counter() - start > deadline and drawn < gate.samples * (k + 1):
                stopped = True
                break
    figures, value, verdict = metric.result(threshold)
    if stopped:
        progress(f"{stage}: quality gate drew {drawn} images in its {budget:g} s (max_seconds)")
    result: dict = {
        "metric": name,
        "threshold": threshold,
        "samples": gate.samples,
        "drawn": drawn,
        "stopped_at_max_seconds": stopped,
        "seeds": list(gate.seeds),
        "batch": batch,
        "image_rmse": rmse.result(threshold)[1],
        **figures,
        "value": value,
    }
    result["passed"] = bool(value <= threshold)
    progress(f"{stage}: quality gate {'passed' if result['passed'] else 'FAILED'}: {verdict}")
    if not result["passed"]:
        raise StageError(
            stage,
            f"quality gate failed: {verdict}; no artifact was written. Calibrate on more "
            "samples, quantize fewer op types, or raise gate.threshold if the loss is acceptable",
        )
    return result
