"""The profile stage: latency and image quality of an engine against its teacher, in one run.

Latency (harness in ``accel.profile``): per denoising step and end to end (noise -> image), for the
teacher in torch eager at its full step count with classifier-free guidance, the student in torch
eager and the student's engine, interleaved after warm-up. Quality (``accel.quality``): FD-digits and
class accuracy of the teacher at its full step count, the teacher's own DDIM at the student's step
count, and the engine, each the mean over seeds of ``quality_samples`` samples.
"""

from __future__ import annotations

import time

import numpy as np
from pydantic import Field

from accel.core.errors import StageError, TargetError
from accel.core.plan import SamplerPlan
from accel.core.stage import Stage, StageConfig, StageContext


class ProfileConfig(StageConfig):
    batch_size: int | None = Field(None, ge=1)
    """Images per call; default: the target's optimal batch."""
    warmup: int | None = Field(None, ge=0)
    """Warm-up calls per workload; default: the target's."""
    iterations: int | None = Field(None, ge=1)
    """Timed per-step calls per workload; default: the target's."""
    e2e_iterations: int = Field(10, ge=1)
    """Timed end-to-end runs (noise -> image) per workload."""
    teacher_steps: int = Field(50, ge=1)
    quality_samples: int = Field(1000, ge=10)
    quality_seeds: list[int] = Field([0, 1], min_length=1)
    engine_spinning: bool = False
    """Let onnxruntime's idle threads busy-wait between calls. Off by default: in an interleaved
    run the spinning threads would take the cores of the torch call that follows."""


def _lineage(ctx: StageContext):
    """(student checkpoint dir, teacher checkpoint dir) of the engine, from the store."""
    chain = ctx.store.lineage(ctx.input)
    checkpoints = [a for a in chain if a.kind == "checkpoint"]
    if len(checkpoints) < 2:
        raise StageError(
            "profile",
            f"the store at {ctx.store.root} does not hold the student and "
            f"teacher this engine was built from (found {[a.stage for a in chain]}); "
            "profile engines produced by `accel run` on the same store",
        )
    return checkpoints[0].path, checkpoints[-1].path


def run(ctx: StageContext) -> None:
    config: ProfileConfig = ctx.config  # type: ignore[assignment]
    import torch

    from accel.profile import environment, measure_interleaved
    from accel.quality import evaluate_images, fd_floor, generate
    from accel.report import write_report
    from accel.runtime import TorchRuntime, open_engine, sample, step_feeds
    from distill.denoiser import DenoiserGraph, load_denoiser
    from distill.samplers import sampler_plan

    target = ctx.target
    batch = config.batch_size or target.shapes.batch.opt
    if not target.shapes.batch.min <= batch <= target.shapes.batch.max:
        raise TargetError(
            f"batch {batch} is outside target {target.name!r}'s batch profile "
            f"{target.shapes.batch.min}..{target.shapes.batch.max}; pick a batch_size inside it"
        )
    warmup = target.profile.warmup if config.warmup is None else config.warmup
    iterations = config.iterations or target.profile.iterations
    student_dir, teacher_dir = _lineage(ctx)
    student, s_info = load_denoiser(student_dir)
    w = float(s_info.get("distilled_guidance_scale", 1.0))
    teacher, t_info = load_denoiser(teacher_dir, guidance_scale=w)
    num_classes = t_info.get("num_classes")
    engine, engine_plan = open_engine(ctx.input.path, target, spin=config.engine_spinning)
    steps = len(engine_plan.steps)
    plans = {
        "teacher": sampler_plan(teacher, config.teacher_steps, num_classes),
        "teacher_ddim": sampler_plan(teacher, steps, num_classes),
        "student": sampler_plan(student, steps, num_classes),
    }
    threads = torch.get_num_threads()
    runtimes = {
        "teacher": TorchRuntime(DenoiserGraph.of(teacher)),
        "student": TorchRuntime(DenoiserGraph.of(student)),
        "engine": engine,
    }
    rng = np.random.default_rng(1234)
    noise = rng.standard_normal((batch, *engine_plan.sample_shape)).astype(np.float32)
    labels = (np.arange(batch) % (num_classes or 1)).astype(np.int64) if num_classes else None

    def first_step(plan: SamplerPlan) -> dict:
        return step_feeds(plan, noise, plan.steps[0]["timestep"], labels)

    def call(rt, feeds):
        return lambda: rt.infer(feeds)

    def e2e(rt, plan):
        return lambda: sample(rt, plan, noise, labels, np.random.default_rng(0))

    ctx.progress(
        f"profile: per-step latency, batch {batch}, {warmup} warm-up + {iterations} calls each"
    )
    per_step = measure_interleaved(
        {
            f"teacher eager ({'cfg, ' if plans['teacher'].guidance_scale != 1 else ''}per step)": call(
                runtimes["teacher"], first_step(plans["teacher"])
            ),
            "student eager (per step)": call(runtimes["student"], first_step(plans["student"])),
            "student onnxruntime (per step)": call(runtimes["engine"], first_step(engine_plan)),
        },
        warmup,
        iterations,
    )
    ctx.progress(f"profile: end-to-end latency, {config.e2e_iterations} runs each")
    end_to_end = measure_interleaved(
        {
            f"teacher eager, {config.teacher_steps} steps": e2e(
                runtimes["teacher"], plans["teacher"]
            ),
            f"student eager, {steps} steps": e2e(runtimes["student"], plans["student"]),
            f"student onnxruntime, {steps} steps": e2e(runtimes["engine"], engine_plan),
        },
        min(warmup, 2),
        config.e2e_iterations,
    )

    quality: dict[str, dict] = {}
    grids: dict[str, np.ndarray] = {}
    subjects = {
        f"teacher, {config.teacher_steps} steps": (runtimes["teacher"], plans["teacher"]),
        f"teacher DDIM, {steps} steps": (runtimes["teacher"], plans["teacher_ddim"]),
        f"student onnxruntime, {steps} steps": (runtimes["engine"], engine_plan),
    }
    for name, (rt, plan) in subjects.items():
        t0 = time.perf_counter()
        per_seed = []
        for seed in config.quality_seeds:
            images, lab = generate(rt, plan, config.quality_samples, seed, num_classes)
            per_seed.append(dict(evaluate_images(images, lab), seed=seed))
            if seed == config.quality_seeds[0]:
                grids[name] = images
        quality[name] = {
            "fd_digits": float(np.mean([r["fd_digits"] for r in per_seed])),
            "class_accuracy": float(np.mean([r["class_accuracy"] for r in per_seed])),
            "per_seed": per_seed,
        }
        ctx.progress(
            f"profile: quality of {name}: FD-digits {quality[name]['fd_digits']:.3f}, "
            f"accuracy {quality[name]['class_accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)"
        )

    teacher_e2e, _, engine_e2e = (v["p50"] for v in end_to_end.values())
    report = {
        "schema": "accel.report/1",
        "target": {"name": target.name, "fingerprint": target.fingerprint},
        "environment": environment(threads),
        "batch_size": batch,
        "guidance_scale": w,
        "steps": {"teacher": config.teacher_steps, "student": steps},
        "latency_ms": {"per_step": per_step, "end_to_end": end_to_end},
        "speedup_end_to_end_p50": teacher_e2e / engine_e2e,
        "quality": quality,
        "fd_floor": fd_floor(),
        "quality_samples": config.quality_samples,
        "quality_seeds": list(config.quality_seeds),
    }
    write_report(ctx.out, report, grids, num_classes)
    ctx.metrics.update(
        speedup_end_to_end_p50=report["speedup_end_to_end_p50"],
        fd_digits={k: v["fd_digits"] for k, v in quality.items()},
        class_accuracy={k: v["class_accuracy"] for k, v in quality.items()},
    )


STAGE = Stage(
    name="profile",
    version=1,
    config=ProfileConfig,
    consumes="engine",
    produces="report",
    run=run,
    target_specific=True,
    description="latency (per step, end to end) and quality of the engine against its teacher",
)
