"""Compile an ONNX graph into an onnxruntime engine for one target.

onnxruntime's offline mode (``SessionOptions.optimized_model_filepath``) saves the graph after its
optimisers ran: constant folding, fusions and, at level "all", layout transforms chosen for the
machine's execution provider, which is why the engine is target-specific and keyed on the target's
fingerprint. The stage refuses a provider that onnxruntime does not actually enable (it would fall
back to CPU silently) and proves parity of the engine against the unoptimised graph.
"""

from __future__ import annotations

import shutil
import time
from typing import Literal

from accel.core.errors import CheckpointError, StageError
from accel.core.plan import PLAN_FILE, SamplerPlan
from accel.core.stage import Stage, StageConfig, StageContext

ENGINE_FILE = "model.onnx"
LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class OrtConfig(StageConfig):
    provider: Literal[
        "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    ] = "CPUExecutionProvider"
    optimization_level: Literal["basic", "extended", "all"] = "all"
    intra_op_threads: int | None = None


def engine_from_onnx(src, dst, provider: str, level: str, threads: int | None) -> None:
    """Run onnxruntime's optimisers for ``provider`` on ``src`` and save the result at ``dst``."""
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        raise StageError(
            "ort",
            f"{provider} is not available in this onnxruntime build "
            f"(available: {ort.get_available_providers()}); for GPU targets install "
            "accel[gpu] in place of onnxruntime",
        )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    opts.optimized_model_filepath = str(dst)
    opts.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", dst.name + ".data"
    )
    opts.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
    )
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), opts, providers=[provider])
    except Exception as e:
        raise StageError(
            "ort", f"onnxruntime cannot compile {src}: {str(e).strip()[:300]}"
        ) from None


def run(ctx: StageContext) -> None:
    config: OrtConfig = ctx.config  # type: ignore[assignment]
    from accel.runtime import OrtRuntime, step_feeds
    from export.onnx_export import MODEL_FILE
    from export.parity import compare, describe_failure

    src = ctx.input.path / MODEL_FILE
    plan = SamplerPlan.load(ctx.input.path / PLAN_FILE)
    t0 = time.perf_counter()
    ctx.progress(
        f"ort: optimising for {ctx.target.name} ({config.provider}, level {config.optimization_level})"
    )
    engine_from_onnx(
        src,
        ctx.out / ENGINE_FILE,
        config.provider,
        config.optimization_level,
        config.intra_op_threads,
    )
    compile_s = time.perf_counter() - t0
    shutil.copy(ctx.input.path / PLAN_FILE, ctx.out / PLAN_FILE)
    try:
        reference = OrtRuntime(src, optimize=False)
        engine = OrtRuntime(ctx.out / ENGINE_FILE, provider=config.provider)
    except CheckpointError as e:
        raise StageError("ort", str(e)) from None
    import numpy as np

    rng = np.random.default_rng(0)
    c, h, w = plan.sample_shape
    feeds = []
    for b in sorted({1, ctx.target.shapes.batch.opt}):
        labels = np.arange(b, dtype=np.int64) % (plan.num_classes or 1)
        x = rng.standard_normal((b, c, h, w)).astype(np.float32)
        timesteps = np.array([s["timestep"] for s in plan.steps], np.int64)
        conditional = "class_labels" in engine.inputs()
        feeds.append(step_feeds(plan, x, timesteps, labels if conditional else None))
    report = compare(reference, [engine], feeds, "fp32")
    if not report["passed"]:
        raise StageError(
            "ort", "the engine disagrees with its ONNX graph: " + describe_failure(report)
        )
    import onnxruntime as ort

    ctx.metrics.update(compile_seconds=compile_s, parity=report)
    ctx.info.update(
        backend="onnxruntime",
        provider=config.provider,
        onnxruntime_version=ort.__version__,
        engine_file=ENGINE_FILE,
    )


STAGE = Stage(
    name="ort",
    version=1,
    config=OrtConfig,
    consumes="onnx",
    produces="engine",
    run=run,
    target_specific=True,
    description="compile the ONNX graph into an onnxruntime engine for the target",
)
