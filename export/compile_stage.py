"""What every compile stage shares (one backend = one runtime, one compile stage and one row of
``accel.registry.BACKENDS``): its declaration, named by the backend's row, and its ending: the
engine description recorded, per-step parity of the engine against its parent on the same feeds
(``export.parity``, Polygraphy's comparator: the unoptimised ONNX graph for ``ort`` and
``tensorrt``, eager torch for ``aoti`` and ``torch_compile``), then the quality gate on images
(``export.quality_gate``). Parity failing stops the stage, except for INT8/FP8 engines, whose
integer kernels round differently from their Q/DQ reference: the gate judges those on images and
the parity figures are recorded."""

from __future__ import annotations

from collections.abc import Callable

from accel.core.engine_info import EngineInfo
from accel.core.errors import StageError
from accel.core.stage import Stage, StageConfig, StageContext
from accel.registry import BACKENDS
from export.quality_gate import GateConfig, quality_gate


def compile_stage(
    backend: str,
    *,
    version: int,
    config: type[StageConfig],
    consumes: str,
    run: Callable[[StageContext], None],
    description: str,
    requires: tuple[str, ...] = ("pixel",),
) -> Stage:
    """The ``Stage`` of ``backend``'s compiler: it makes a target-specific engine."""
    return Stage(
        name=BACKENDS[backend].stage,
        version=version,
        config=config,
        consumes=consumes,
        produces="engine",
        run=run,
        target_specific=True,
        description=description,
        requires=requires,
    )


def parity_batches(ctx: StageContext) -> list[int]:
    """The batch sizes parity is checked at: one image and the target's optimal batch."""
    return sorted({1, ctx.target.shapes.batch.opt})


def verify_engine(
    ctx: StageContext,
    info: EngineInfo,
    parity: tuple,
    gate: GateConfig,
    parent: tuple,
    candidate: tuple,
    feeds: list[dict] | None = None,
    tolerance: str | None = None,
    **figures,
) -> None:
    """The end of every compile stage: record ``info``; compare ``parity`` = (reference runtime,
    engine runtime, plan) on ``feeds`` (default: ``export.parity.plan_feeds`` of the plan at
    ``parity_batches``) within the tolerance of ``tolerance`` (default: the engine's precision);
    gate the ``candidate`` = (runtime, plan) against the ``parent`` on images; keep the parity
    report, the gate's figures and ``figures`` in the stage's metrics."""
    from export.parity import TOLERANCES, compare, describe_failure, plan_feeds

    stage = BACKENDS[info.backend].stage
    ctx.info.update(info.to_dict())
    reference, engine, plan = parity
    if feeds is None:
        feeds = plan_feeds(plan, engine.inputs(), parity_batches(ctx))
    quantized = info.precision in ("int8", "fp8")
    precision = tolerance or (info.precision if info.precision in TOLERANCES else "fp32")
    ctx.progress(f"{stage}: parity with {reference.name} ({len(feeds)} feeds, {precision})")
    report = compare(reference, [engine], feeds, precision)
    if not report["passed"] and not quantized:
        raise StageError(
            stage, f"the engine disagrees with {reference.name}: " + describe_failure(report)
        )
    result = quality_gate(stage, gate, parent, candidate, ctx.progress, batch=ctx.target.draw_batch)
    ctx.metrics.update(figures, parity=report, quality_gate=result)
