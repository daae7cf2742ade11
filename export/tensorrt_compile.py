"""Compile an ONNX graph into a native TensorRT engine for one GPU target, through TensorRT's
Python API (``tensorrt``, imported only when this stage runs).

The builder follows TensorRT's developer guide: the ONNX parser fills a network definition;
Q/DQ graphs (INT8 / FP8 from the quantize stages) build as *strongly typed* networks, so the
precision of every tensor comes from the graph and TensorRT does not pick its own; otherwise the
target's precision sets the FP16/BF16 builder flags. One optimisation profile spans the target's
batch range (min/opt/max); the builder optimisation level, workspace, hardware-compatibility level
and version compatibility come from the target's ``[builder]`` table. A timing cache is kept beside
the engine, and the equivalent ``trtexec`` command line is written as ``trtexec.sh``, so the build
can be reproduced or tuned by hand.

TensorRT cannot be installed on machines without NVIDIA's package index and a GPU: there the stage
stops with an error that says so. The code is type-checked with mypy against ``tensorrt-stubs``
(tests/test_tensorrt.py) and exercised on a GPU under the ``gpu`` marker.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError, StageError
from accel.core.plan import PLAN_FILE, SamplerPlan, batch_factor
from accel.core.stage import StageConfig, StageContext
from accel.runtime.tensorrt import TensorRTRuntime, tensorrt_missing
from export.compile_stage import compile_stage, verify_engine
from export.quality_gate import GateConfig

if TYPE_CHECKING:
    from accel.core.target import Target

ENGINE_FILE = "model.plan"
TIMING_CACHE = "timing.cache"
TRTEXEC_FILE = "trtexec.sh"
HARDWARE_LEVELS = {
    "none": "NONE",
    "ampere_plus": "AMPERE_PLUS",
    "same_compute_capability": "SAME_COMPUTE_CAPABILITY",
}
TRTEXEC_LEVELS = {
    "none": "none",
    "ampere_plus": "ampere+",
    "same_compute_capability": "sameComputeCapability",
}


class TensorRTConfig(StageConfig):
    strongly_typed: bool | None = None
    """Default: on for quantized (Q/DQ) graphs, off otherwise."""
    gate: GateConfig = GateConfig()
    """The quality gate against the ONNX parent in onnxruntime
    (``export.quality_gate.GateConfig``)."""
    max_parse_errors: int = Field(5, ge=1)
    """Parser errors quoted when TensorRT refuses the graph."""
    cuda_graph: bool = True
    """The runtime replays each batch bucket's enqueue from a CUDA graph (trtexec's
    --useCudaGraph)."""


def import_tensorrt() -> None:
    """StageError unless ``tensorrt`` (not just its stubs) is importable. Callers then
    ``import tensorrt as trt`` themselves, so mypy checks their calls against the stubs."""
    why = tensorrt_missing()
    if why:
        raise StageError("tensorrt", why)


def profile_shapes(
    target: Target, inputs: dict[str, list], factor: int = 1
) -> dict[str, dict[str, list[int]]]:
    """Per input, its min/opt/max shape from the target's profile: the dynamic (negative or
    named) first axis takes the batch range (times ``factor``: guidance doubles the batch each
    call sees), the dynamic last two axes of an image input (4-D and up) take the resolution."""
    b = target.shapes.batch
    batch = type(b)(min=b.min * factor, opt=b.opt * factor, max=b.max * factor)
    ranges = {"batch": batch, "resolution": target.shapes.resolution}

    def axis_range(axis: int, rank: int) -> str:
        return "resolution" if rank >= 4 and axis >= rank - 2 else "batch"

    return {
        name: {
            which: [
                getattr(ranges[axis_range(i, len(dims))], which)
                if not isinstance(d, int) or d < 0
                else d
                for i, d in enumerate(dims)
            ]
            for which in ("min", "opt", "max")
        }
        for name, dims in inputs.items()
    }


def trtexec_command(
    target: Target, onnx_file: str, shapes: dict[str, dict[str, list[int]]], strongly_typed: bool
) -> str:
    """The trtexec command line that builds the same engine."""

    def spec(which: str) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, s[which]))}" for n, s in shapes.items())

    b = target.builder
    args = [
        "trtexec",
        f"--onnx={onnx_file}",
        f"--saveEngine={ENGINE_FILE}",
        f"--minShapes={spec('min')}",
        f"--optShapes={spec('opt')}",
        f"--maxShapes={spec('max')}",
        f"--builderOptimizationLevel={b.optimization_level}",
        f"--timingCacheFile={TIMING_CACHE}",
    ]
    if b.workspace_mib:
        args.append(f"--memPoolSize=workspace:{b.workspace_mib}M")
    if strongly_typed:
        args.append("--stronglyTyped")
    elif target.precision in ("fp16", "bf16"):
        args.append(f"--{target.precision}")
    if b.hardware_compatibility != "none":
        args.append(f"--hardwareCompatibilityLevel={TRTEXEC_LEVELS[b.hardware_compatibility]}")
    if b.version_compatible:
        args.append("--versionCompatible")
    return " ".join(shlex.quote(a) for a in args)


def trtexec_timing_command(shapes: dict[str, dict[str, list[int]]], cuda_graph: bool) -> str:
    """The trtexec command that times the built engine at the profile's opt shapes the way the
    runtime runs it (replayed from a CUDA graph, with spin-wait sync)."""
    opt = ",".join(f"{n}:{'x'.join(map(str, s['opt']))}" for n, s in shapes.items())
    args = ["trtexec", f"--loadEngine={ENGINE_FILE}", f"--shapes={opt}", "--useSpinWait"]
    if cuda_graph:
        args.append("--useCudaGraph")
    return " ".join(shlex.quote(a) for a in args)


def onnx_input_dims(path: Path) -> dict[str, list]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {
        i.name: [
            d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim
        ]
        for i in model.graph.input
    }


def build_engine(
    onnx_path: Path,
    target: Target,
    shapes: dict[str, dict[str, list[int]]],
    strongly_typed: bool,
    timing_cache: bytes,
    max_errors: int = 5,
) -> tuple[bytes, bytes]:
    """(serialized engine, serialized timing cache) for ``onnx_path`` on this machine's GPU."""
    import_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(min(parser.num_errors, max_errors))]
        raise StageError(
            "tensorrt", f"TensorRT's ONNX parser rejected {onnx_path.name}: {'; '.join(errors)}"
        )
    config = builder.create_builder_config()
    opts = target.builder
    config.builder_optimization_level = opts.optimization_level
    if opts.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    if not strongly_typed and target.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if not strongly_typed and target.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    config.hardware_compatibility_level = getattr(
        trt.HardwareCompatibilityLevel, HARDWARE_LEVELS[opts.hardware_compatibility]
    )
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        s = shapes[name]
        profile.set_shape(name, trt.Dims(s["min"]), trt.Dims(s["opt"]), trt.Dims(s["max"]))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StageError(
            "tensorrt",
            "TensorRT could not build an engine (see its log above); try a lower "
            "builder.optimization_level or a larger builder.workspace_mib in the target",
        )
    return bytes(memoryview(serialized)), bytes(memoryview(cache.serialize()))


def fp32_student(ctx: StageContext, plan: SamplerPlan):
    """The torch student this graph was quantized from (the nearest checkpoint in its lineage),
    as the gate's reference when onnxruntime cannot run the graph itself."""
    from export.onnx_export import graph_and_plan
    from export.torch_runtime import TorchRuntime

    student = next((a for a in ctx.store.lineage(ctx.input) if a.kind == "checkpoint"), None)
    if student is None:
        raise StageError(
            "tensorrt",
            "onnxruntime cannot run this graph (TensorRT-only ops) and the store holds no student "
            'it came from, so the quality gate has no reference; set gate.metric = "off"',
        )
    graph, _ = graph_and_plan("tensorrt", student.path, len(plan.steps), plan.guidance_scale)
    return TorchRuntime(graph)


def run(ctx: StageContext) -> None:
    config: TensorRTConfig = ctx.config  # type: ignore[assignment]
    from accel.runtime import OrtRuntime
    from export.onnx_export import MODEL_FILE

    target = ctx.target
    if target.device != "cuda":
        raise StageError(
            "tensorrt",
            f"target {target.name!r} is a {target.device} target; TensorRT engines run on NVIDIA "
            "GPUs only: pick a GPU target, or compile with --backend ort for this one",
        )
    src = ctx.input.path / MODEL_FILE
    quantized = ctx.input.info.get("precision") in ("int8", "fp8")
    strongly_typed = quantized if config.strongly_typed is None else config.strongly_typed
    plan = SamplerPlan.load(ctx.input.path / PLAN_FILE)
    if plan.components:
        raise StageError(
            "tensorrt",
            "this is a text-to-image pipeline (text encoder, UNet, VAE decoder graphs); the "
            "TensorRT stage builds single-graph engines so far: compile it with --backend ort",
        )
    dims = onnx_input_dims(src)
    factor = batch_factor(plan, dims)
    shapes = profile_shapes(target, dims, factor)
    command = trtexec_command(target, MODEL_FILE, shapes, strongly_typed)
    (ctx.out / TRTEXEC_FILE).write_text(
        f"#!/bin/sh\n# builds the same engine as accel's tensorrt stage\n{command}\n"
        f"# times it as accel's runtime runs it\n"
        f"{trtexec_timing_command(shapes, config.cuda_graph)}\n"
    )
    try:
        import_tensorrt()
    except StageError as e:
        raise StageError(
            "tensorrt", f"{e.message}. The same build with trtexec: {command}"
        ) from None
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise StageError("tensorrt", "TensorRT is installed but torch sees no CUDA GPU here")
    ctx.progress(
        f"tensorrt: building for {target.name} ({'strongly typed' if strongly_typed else target.precision}, "
        f"level {target.builder.optimization_level})"
    )
    t0 = time.perf_counter()
    engine, cache = build_engine(src, target, shapes, strongly_typed, b"", config.max_parse_errors)
    (ctx.out / ENGINE_FILE).write_bytes(engine)
    (ctx.out / TIMING_CACHE).write_bytes(cache)
    build_s = time.perf_counter() - t0
    plan.save(ctx.out / PLAN_FILE)
    major, minor = torch.cuda.get_device_capability()
    info = EngineInfo(
        backend="tensorrt",
        engine_file=ENGINE_FILE,
        library_version=trt.__version__,
        precision=ctx.input.info.get("precision", target.precision),
        device="cuda",
        batch_range=[target.shapes.batch.min * factor, target.shapes.batch.max * factor],
        options={
            "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}",
            "hardware_compatibility": target.builder.hardware_compatibility,
            "version_compatible": target.builder.version_compatible,
            "strongly_typed": bool(strongly_typed),
            "cuda_graph": config.cuda_graph,
        },
    )
    engine_rt = TensorRTRuntime(ctx.out / ENGINE_FILE, info)
    try:
        reference = OrtRuntime(src, optimize=False)
    except CheckpointError:  # FP8 Q/DQ in TensorRT's own ops: gate against the fp32 student
        reference = fp32_student(ctx, plan)
    # fp32 builds run matmuls and convolutions in TF32 (TensorRT's default on Ampere and later)
    tolerance = "tf32" if info.precision == "fp32" else None
    verify_engine(
        ctx, info, (reference, engine_rt, plan), config.gate, (reference, plan), (engine_rt, plan),
        tolerance=tolerance, build_seconds=build_s, engine_bytes=len(engine),
    )  # fmt: skip


STAGE = compile_stage(
    "tensorrt",
    version=1,
    config=TensorRTConfig,
    consumes="onnx",
    run=run,
    description="build a native TensorRT engine (strongly typed for Q/DQ graphs) for a GPU target",
)
