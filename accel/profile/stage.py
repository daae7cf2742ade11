"""Profiling runs: `profile_runtimes` measures several runtimes in one run with the harness in
``accel.profile`` (interleaved, per scenario, with a per-stage breakdown, peak memory, the
environment and the target's latency budget), and optionally their image quality. `accel profile`
calls it on any artifacts; the recipe stage ``profile`` calls it on an engine, its student in eager
torch and its teacher at its full step count with classifier-free guidance, and adds the quality of
the teacher's own DDIM at the student's step count.
"""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime
from typing import Literal

import numpy as np
from pydantic import Field

from accel.core.errors import StageError, TargetError
from accel.core.stage import Stage, StageConfig, StageContext

Scenario = Literal["single_stream", "offline", "server"]
SCHEMA = "accel.report/2"
PROFILE_PROMPT = "a photo"
"""The prompt of the queries to a text-to-image model, numbered so that every query is a new one:
the profile measures the pipeline on prompts it has not seen (a bundle caches the text encoder's
output per prompt; a cache hit would hide the encoder), not the prompt (text encoders pad to a
fixed length; short, so that a small encoder's limit truncates nothing)."""


class ProfileConfig(StageConfig):
    scenarios: list[Scenario] = Field(["single_stream"], min_length=1)
    """MLPerf LoadGen scenarios to run; SingleStream's p90 is checked against the latency budget."""
    batch_size: int | None = Field(None, ge=1)
    """Images per SingleStream query; default: the target's scenarios.single_stream_batch."""
    warmup_iterations: int | None = Field(None, ge=0)
    """Default for these four: the target's [harness] table."""
    warmup_ms: float | None = Field(None, ge=0)
    """Warm-up time per workload before timing."""
    iterations: int | None = Field(None, ge=1)
    """Fixed timed rounds (instead of a duration)."""
    duration_ms: float | None = Field(None, ge=0)
    """Timing per workload."""
    breakdown_repeats: int = Field(5, ge=1)
    """Calls run with the per-stage breakdown recorded (outside the timed rounds)."""
    teacher_steps: int = Field(50, ge=1)
    """Steps of the teacher baseline the engine is compared with."""
    quality_samples: int = Field(1000, ge=10)
    """Images per seed of the quality figures (FD-digits, accuracy)."""
    quality_seeds: list[int] = Field([0, 1], min_length=1)
    """Seeds of the quality figures (their mean is reported)."""
    engine_spinning: bool = False
    """Let onnxruntime's idle threads busy-wait between calls. Off by default: in an interleaved
    run the spinning threads would take the cores of the torch call that follows."""


def _check_batch(target, batch: int, what: str) -> None:
    b = target.shapes.batch
    if not b.min <= batch <= b.max:
        raise TargetError(
            f"{what} batch {batch} is outside target {target.name!r}'s batch profile "
            f"{b.min}..{b.max}; pick a batch inside it"
        )


def profile_runtimes(
    subjects: dict,
    target,
    scenarios: list[str],
    harness,
    batch: int | None = None,
    rate_qps: float | None = None,
    server_duration_s: float | None = None,
    breakdown_repeats: int = 5,
    progress=print,
) -> dict:
    """Measure ``subjects`` ({name: (runtime, plan)}), one end-to-end sampling call (noise ->
    image) per query, in each scenario; returns a report (schema ``accel.report/2``, documented
    in docs/report-schema.md) without quality."""
    from accel.core.hardware import environment, target_mismatch
    from accel.profile.harness import (
        breakdown,
        cv_warning,
        measure,
        paired_ratio,
        run_server,
    )
    from accel.runtime import run_pipeline, sample

    single = batch or target.scenarios.single_stream_batch
    batches = {"single_stream": single, "offline": target.shapes.batch.max, "server": single}
    for scenario in scenarios:
        _check_batch(target, batches[scenario], scenario.replace("_", " "))

    def call(runtime, plan, n: int):
        rng = np.random.default_rng(1234)
        noise = rng.standard_normal((n, *plan.sample_shape)).astype(np.float32)
        labels = (np.arange(n) % plan.num_classes).astype(np.int64) if plan.num_classes else None
        if not plan.decode:  # pixel models (the digits path)
            return lambda: sample(runtime, plan, noise, labels, np.random.default_rng(0))
        if plan.conditioning_kind != "text":
            return lambda: run_pipeline(
                runtime, plan, noise, None, labels, np.random.default_rng(0)
            )
        queries = itertools.count()

        def query():
            q = next(queries)
            prompts = [f"{PROFILE_PROMPT} {q} {i}" for i in range(n)]
            return run_pipeline(runtime, plan, noise, prompts, labels, np.random.default_rng(0))

        return query

    report: dict = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "target": {
            "name": target.name,
            "fingerprint": target.fingerprint,
            "device": target.device,
            "latency_budget_ms": target.latency_budget_ms,
        },
        "harness": {k: getattr(harness, k) for k in harness.__dataclass_fields__},
        "workloads": {
            name: {
                "runtime": rt.name,
                "steps": len(plan.steps),
                "guidance_scale": plan.guidance_scale,
                "sample_shape": list(plan.sample_shape),
            }
            for name, (rt, plan) in subjects.items()
        },
        "scenarios": {},
        "warnings": [],
    }
    for scenario in scenarios:
        n = batches[scenario]
        if scenario == "server":
            rate = rate_qps or target.scenarios.server_rate_qps
            duration = server_duration_s or target.scenarios.server_duration_s
            bound = target.server_latency_bound_ms
            results = {}
            for name, (rt, plan) in subjects.items():
                progress(f"profile: server, {name}: Poisson {rate} q/s for {duration} s")
                fn = call(rt, plan, n)
                fn()  # warm
                results[name] = run_server(fn, rate, duration, bound)
                if results[name]["unserved"]:
                    report["warnings"].append(
                        f"server, {name}: {results[name]['unserved']} of "
                        f"{results[name]['queries']} queries were not served within twice the "
                        f"duration: {rate} q/s is above what it sustains"
                    )
            report["scenarios"]["server"] = {
                "batch": n,
                "rate_qps": rate,
                "duration_s": duration,
                "bound_ms": bound,
                "metric": "p99",
                "results": results,
            }
            continue
        progress(f"profile: {scenario}, batch {n}, {len(subjects)} workloads interleaved")
        measured = measure(
            {name: call(rt, plan, n) for name, (rt, plan) in subjects.items()}, harness
        )
        results = {}
        for name, m in measured.items():
            stats = m.stats()
            results[name] = {
                "latency_ms": stats,
                "times_ms": m.times_ms,
                "warmup": {"iterations": m.warmup_iterations, "ms": m.warmup_ms},
                "memory": m.memory,
                # LoadGen's throughput: every image over the time of every timed query
                "images_per_s": n * len(m.times_ms) * 1e3 / sum(m.times_ms),
            }
            warning = cv_warning(f"{scenario}, {name}", stats)
            if warning:
                report["warnings"].append(warning)
        names = list(measured)
        report["scenarios"][scenario] = {
            "batch": n,
            "metric": "p90" if scenario == "single_stream" else "images_per_s",
            "results": results,
            "ratios": [
                dict(
                    paired_ratio(measured[a].times_ms, measured[b].times_ms),
                    baseline=a,
                    subject=b,
                )
                for i, a in enumerate(names)
                for b in names[i + 1 :]
            ],
        }
    progress(f"profile: per-stage breakdown, batch {single}, {breakdown_repeats} calls each")
    report["breakdown"] = {
        name: breakdown(call(rt, plan, single), breakdown_repeats)
        for name, (rt, plan) in subjects.items()
    }
    budget = target.latency_budget_ms
    if budget is not None and "single_stream" in report["scenarios"]:
        ss = report["scenarios"]["single_stream"]["results"]
        report["budget"] = {
            "latency_budget_ms": budget,
            "results": {
                name: {"p90_ms": r["latency_ms"]["p90"], "met": r["latency_ms"]["p90"] <= budget}
                for name, r in ss.items()
            },
        }
    report["environment"] = environment(threads=_torch_threads())
    mismatch = target_mismatch(target, report["environment"])
    if mismatch:
        report["warnings"].append(mismatch)
    return report


def _torch_threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


GRID_IMAGES = 100  # a sample grid's: 10 per class of the 10 digits (report.image_grid)


def _keeping(batches, kept: list, limit: int):
    """The (images, labels) batches passed through, their first ``limit`` images noted in
    ``kept``."""
    for images, labels in batches:
        room = limit - sum(map(len, kept))
        if room > 0:
            kept.append(images[:room])
        yield images, labels


def measure_quality(
    subjects: dict,
    samples: int,
    seeds: list[int],
    progress=print,
    cache: dict | None = None,
    batch: int = 64,
):
    """FD-digits and class accuracy per subject, means over seeds, drawn in batches of ``batch``
    (only the classifier's features are kept); and the first seed's first ``GRID_IMAGES``
    images (for sample grids). A subject with a file in ``cache`` (the teacher's reference quality, in
    the store's ``cache/``) is measured once: later calls read its figures and images back."""
    import json

    from safetensors.numpy import load_file, save_file

    from accel.demo.digits import evaluate_batches
    from accel.runtime import draw

    quality: dict[str, dict] = {}
    grids: dict[str, np.ndarray] = {}
    for name, (rt, plan) in subjects.items():
        t0 = time.perf_counter()
        file = (cache or {}).get(name)
        if file is not None and file.is_file():
            from safetensors import safe_open

            with safe_open(str(file), "numpy") as f:
                quality[name] = json.loads(f.metadata()["quality"])
            grids[name] = load_file(str(file))["images"]
            progress(f"profile: quality of {name} from the store ({file.name})")
            continue
        per_seed = []
        for seed in seeds:
            kept: list[np.ndarray] = []  # the grid's images: the first seed's first ones
            stream = draw(rt, plan, samples, seed, batch, plan.evaluation_prompts)
            if seed == seeds[0]:
                stream = _keeping(stream, kept, GRID_IMAGES)
            per_seed.append(dict(evaluate_batches(stream), seed=seed))
            if kept:
                grids[name] = np.concatenate(kept)
        quality[name] = {
            "fd_digits": float(np.mean([r["fd_digits"] for r in per_seed])),
            "class_accuracy": float(np.mean([r["class_accuracy"] for r in per_seed])),
            "per_seed": per_seed,
        }
        progress(
            f"profile: quality of {name}: FD-digits {quality[name]['fd_digits']:.3f}, "
            f"accuracy {quality[name]['class_accuracy']:.3f} ({time.perf_counter() - t0:.0f}s)"
        )
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_name(file.name + ".tmp")
            images = np.ascontiguousarray(grids[name], dtype=np.float32)
            save_file({"images": images}, str(tmp), {"quality": json.dumps(quality[name])})
            tmp.replace(file)
    return quality, grids


def reference_file(store, teacher, plan, samples: int, seeds: list[int]):
    """Where the store keeps a teacher's reference quality for one sampler plan, sample count
    and seeds: ``cache/reference-<hash>.safetensors`` (the key names the teacher artifact)."""
    import hashlib
    import json
    from dataclasses import asdict

    key = json.dumps([teacher.key, asdict(plan), samples, list(seeds)], sort_keys=True)
    return (
        store.root
        / "cache"
        / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    )


CHAIN_FIGURES = ("wall_seconds", "peak_rss_mb", "peak_child_rss_mb", "peak_gpu_mb")


def chain_figures(lineage: list) -> list[dict]:
    """What each stage that made the engine cost, from its manifest, the source first: stage,
    key, wall seconds and peak memory (resident; a child process's; CUDA's where it ran)."""
    rows = []
    for artifact in reversed(lineage):
        metrics = artifact.metrics
        row = {"stage": artifact.stage, "key": artifact.key}
        row.update({k: metrics[k] for k in CHAIN_FIGURES if k in metrics})
        rows.append(row)
    return rows


def _lineage(ctx: StageContext):
    """(student checkpoint, teacher checkpoint) artifacts of the engine, from the store."""
    chain = ctx.store.lineage(ctx.input)
    checkpoints = [a for a in chain if a.kind == "checkpoint"]
    if len(checkpoints) < 2:
        raise StageError(
            "profile",
            f"the store at {ctx.store.root} does not hold the student and "
            f"teacher this engine was built from (found {[a.stage for a in chain]}); "
            "profile engines produced by `accel run` on the same store, or use "
            "`accel profile ENGINE` for latency alone",
        )
    return checkpoints[0], checkpoints[-1]


def run(ctx: StageContext) -> None:
    config: ProfileConfig = ctx.config  # type: ignore[assignment]
    from accel.core.model_info import ModelInfo
    from accel.demo.digits import fd_floor
    from accel.profile.harness import Harness
    from accel.report import write_report
    from accel.runtime import open_engine
    from export.torch_runtime import open_model

    target = ctx.target
    harness = Harness.of(
        target,
        warmup_iterations=config.warmup_iterations,
        warmup_ms=config.warmup_ms,
        iterations=config.iterations,
        duration_ms=config.duration_ms,
    )
    student_ckpt, teacher_ckpt = _lineage(ctx)
    s_info = ModelInfo.read(student_ckpt.path)
    # the teacher samples at the student's w: baked in, or the w its embedding is sampled with
    w = float(s_info.distilled_guidance_scale or s_info.guidance_scale or 1.0)
    engine, engine_plan = open_engine(ctx.input.path, target, spin=config.engine_spinning)
    steps = len(engine_plan.steps)
    device = "cuda" if target.device == "cuda" else "cpu"
    teacher_rt, teacher_plan = open_model(teacher_ckpt.path, config.teacher_steps, w, device)
    few_rt, few_plan = open_model(teacher_ckpt.path, steps, w, device)
    student_rt, student_plan = open_model(student_ckpt.path, steps, None, device)
    num_classes = teacher_plan.num_classes
    cfg = ", cfg" if teacher_plan.guidance_scale != 1 else ""
    names = {
        "teacher": f"teacher eager, {config.teacher_steps} steps{cfg}",
        "student": f"student eager, {steps} steps",
        "engine": f"student engine ({engine.name}), {steps} steps",
    }
    subjects = {
        names["teacher"]: (teacher_rt, teacher_plan),
        names["student"]: (student_rt, student_plan),
        names["engine"]: (engine, engine_plan),
    }
    report = profile_runtimes(
        subjects,
        target,
        config.scenarios,
        harness,
        batch=config.batch_size,
        breakdown_repeats=config.breakdown_repeats,
        progress=ctx.progress,
    )
    few = f"teacher DDIM, {steps} steps"
    quality_subjects = {
        names["teacher"]: (teacher_rt, teacher_plan),
        few: (few_rt, few_plan),
        names["engine"]: (engine, engine_plan),
    }
    n, seeds = config.quality_samples, config.quality_seeds
    cache = {  # the teacher's figures: computed once per teacher, plan, samples and seeds
        name: reference_file(ctx.store, teacher_ckpt, plan, n, seeds)
        for name, (_, plan) in quality_subjects.items()
        if name != names["engine"]
    }
    quality, grids = measure_quality(
        quality_subjects, n, seeds, ctx.progress, cache, target.draw_batch
    )
    # from a scenario without queueing: SingleStream, else Offline (None for Server alone)
    timed = report["scenarios"].get("single_stream") or report["scenarios"].get("offline")
    speedup = None
    if timed:
        p50 = {k: v["latency_ms"]["p50"] for k, v in timed["results"].items()}
        speedup = p50[names["teacher"]] / p50[names["engine"]]
    report.update(
        chain=chain_figures(ctx.store.lineage(ctx.input)),
        guidance_scale=w,
        steps={"teacher": config.teacher_steps, "student": steps},
        speedup_end_to_end_p50=speedup,
        quality=quality,
        fd_floor=fd_floor(),
        quality_samples=config.quality_samples,
        quality_seeds=list(config.quality_seeds),
    )
    write_report(ctx.out, report, grids, num_classes)
    ctx.metrics.update(
        speedup_end_to_end_p50=speedup,
        fd_digits={k: v["fd_digits"] for k, v in quality.items()},
        class_accuracy={k: v["class_accuracy"] for k, v in quality.items()},
    )


STAGE = Stage(
    name="profile",
    version=3,
    config=ProfileConfig,
    consumes="engine",
    produces="report",
    run=run,
    target_specific=True,
    description="latency (LoadGen scenarios, per-stage breakdown) and quality of the engine "
    "against its teacher",
)
