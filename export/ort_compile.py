"""Compile an ONNX graph into an onnxruntime engine for one target.

CPU: onnxruntime's offline mode (``SessionOptions.optimized_model_filepath``) saves the graph after
its optimisers ran: constant folding, fusions (Q/DQ pairs into QLinearConv for INT8 graphs) and, at
level "all", layout transforms chosen for this machine, which is why the engine is target-specific
and keyed on the target's fingerprint.

GPU: the CUDA and TensorRT execution providers build their kernels when a session opens, so the
engine is the graph plus the provider options taken from the target (fp16, the TensorRT EP's
optimisation profile from the target's min/opt/max shapes, its engine and timing caches inside the
artifact, in a folder named after the target fingerprint and library versions).

The stage refuses a provider that onnxruntime does not actually enable (it falls back to CPU
silently), proves parity of the engine against the unoptimised graph, and passes the quality gate
(``export.quality_gate``) against it.
"""

from __future__ import annotations

import shutil
import time
from typing import Literal

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError, StageError
from accel.core.plan import PLAN_FILE, SamplerPlan, batch_factor
from accel.core.stage import StageConfig, StageContext
from export.compile_stage import compile_stage, parity_batches, verify_engine
from export.quality_gate import GateConfig

ENGINE_FILE = "model.onnx"
LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class OrtConfig(StageConfig):
    provider: (
        Literal["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"] | None
    ) = None
    """Default: the target's first (its ``providers``; CPU on cpu targets, CUDA on cuda ones)."""
    optimization_level: Literal["basic", "extended", "all"] = "all"
    """onnxruntime's graph optimization level of the engine's session."""
    intra_op_threads: int | None = None
    """Threads per operator (default: onnxruntime's, one per core)."""
    cuda_graph: bool = False
    """GPU providers: capture the engine in CUDA graphs (one per batch bucket of the target's
    profile) and replay them; every node must run on the GPU provider (onnxruntime refuses the
    session otherwise). Best on fused samplers, where one replay is the whole few-step loop."""
    gate: GateConfig = GateConfig()
    """The quality gate against the ONNX parent (``export.quality_gate.GateConfig``)."""


def provider_options(
    target, provider: str, cache_dir: str, inputs: dict, factor: int = 1, cuda_graph: bool = False
) -> dict[str, str]:
    """Execution-provider options from the target: fp16 and, for the TensorRT EP, an optimisation
    profile over the target's batch range (trtexec's --minShapes/--optShapes/--maxShapes) and
    engine/timing caches in ``cache_dir``; ``cuda_graph``: the provider's CUDA-graph option."""
    if provider == "CPUExecutionProvider":
        if cuda_graph:
            raise StageError("ort", "cuda_graph needs a GPU provider (CUDA or TensorRT EP)")
        return {}
    if provider == "CUDAExecutionProvider":
        return {"cudnn_conv_algo_search": "EXHAUSTIVE"} | (
            {"enable_cuda_graph": "1"} if cuda_graph else {}
        )
    from export.tensorrt_compile import profile_shapes

    profile = profile_shapes(target, {name: shape for name, (shape, _) in inputs.items()}, factor)

    def shapes(which: str) -> str:
        return ",".join(f"{n}:{'x'.join(map(str, s[which]))}" for n, s in profile.items())

    return {
        "trt_fp16_enable": str(target.precision == "fp16").lower(),
        "trt_int8_enable": "false",  # Q/DQ graphs carry their own scales: explicit quantization
        "trt_engine_cache_enable": "true",
        "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": "true",
        "trt_timing_cache_path": cache_dir,
        "trt_profile_min_shapes": shapes("min"),
        "trt_profile_opt_shapes": shapes("opt"),
        "trt_profile_max_shapes": shapes("max"),
    } | ({"trt_cuda_graph_enable": "true"} if cuda_graph else {})


def engine_from_onnx(src, dst, provider: str, level: str, threads: int | None) -> None:
    """Run onnxruntime's optimisers for ``provider`` on ``src`` and save the result at ``dst``."""
    import onnxruntime as ort

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


def _open(path, provider: str, options: dict[str, str], batch_range: list[int] | None = None):
    from accel.runtime import OrtRuntime

    try:
        return OrtRuntime(path, provider=provider, options=options, batch_range=batch_range)
    except CheckpointError as e:
        raise StageError("ort", str(e)) from None


def run(ctx: StageContext) -> None:
    config: OrtConfig = ctx.config  # type: ignore[assignment]
    import onnxruntime as ort

    from accel.runtime import OrtRuntime
    from export.onnx_export import MODEL_FILE
    from export.parity import compare, describe_failure

    src = ctx.input.path / MODEL_FILE
    plan = SamplerPlan.load(ctx.input.path / PLAN_FILE)
    provider = config.provider or ctx.target.provider
    if provider not in ort.get_available_providers():
        raise StageError(
            "ort",
            f"{provider} is not available in this onnxruntime build "
            f"(available: {ort.get_available_providers()}); for GPU targets install "
            "accel[gpu] in place of onnxruntime",
        )
    t0 = time.perf_counter()
    ctx.progress(
        f"ort: optimising for {ctx.target.name} ({provider}, level {config.optimization_level})"
    )
    try:
        reference = OrtRuntime(src, optimize=False)
    except CheckpointError as e:
        hint = ""
        if "trt" in str(e).lower():
            hint = " (FP8 graphs with TensorRT's custom ops run only in TensorRT)"
        raise StageError("ort", f"{e}{hint}") from None
    options: dict[str, str] = {}
    cpu = provider == "CPUExecutionProvider"
    if cpu and config.cuda_graph:
        raise StageError("ort", "cuda_graph needs a GPU provider (CUDA or TensorRT EP)")
    graph_batches: list[int] | None = None  # the batch range CUDA graphs are captured over
    if cpu:
        engine_from_onnx(
            src, ctx.out / ENGINE_FILE, provider, config.optimization_level, config.intra_op_threads
        )
    else:  # GPU providers compile when a session opens: ship the graph and the options
        for f in ctx.input.path.glob(MODEL_FILE + "*"):
            shutil.copy(f, ctx.out / f.name)
        cache = f"trt-cache-{ctx.target.fingerprint}-ort{ort.__version__}"
        factor = batch_factor(plan, reference.inputs())
        options = provider_options(
            ctx.target, provider, cache, reference.inputs(), factor, config.cuda_graph
        )
        if config.cuda_graph:
            graph_batches = [ctx.target.shapes.batch.min, ctx.target.shapes.batch.max * factor]
    shutil.copy(ctx.input.path / PLAN_FILE, ctx.out / PLAN_FILE)
    fp16 = options.get("trt_fp16_enable") == "true" or ctx.input.info.get("precision") == "fp16"
    precision = "fp16" if fp16 else "fp32"
    component_reports = {}
    if plan.components:  # a pipeline: the text encoder and VAE decoder too, each with parity
        from accel.runtime.pipeline import copy_pipeline_files
        from export.pipeline_export import component_feeds

        copy_pipeline_files(ctx.input.path, ctx.out, plan, [] if cpu else None)
        feeds_of = component_feeds(ctx.input.path, plan, parity_batches(ctx))
        for role, file in plan.components.items():
            ctx.progress(f"ort: optimising the {role.replace('_', ' ')}")
            if cpu:
                engine_from_onnx(
                    ctx.input.path / file, ctx.out / file, provider, config.optimization_level,
                    config.intra_op_threads,
                )  # fmt: skip
            report = compare(
                OrtRuntime(ctx.input.path / file, optimize=False),
                [_open(ctx.out / file, provider, options, graph_batches)],
                feeds_of[role],
                precision,
            )
            quantized_here = role in ctx.input.info.get("quantized_components", [])
            if not report["passed"] and not quantized_here:  # integer kernels: the gate judges
                raise StageError(
                    "ort",
                    f"the {role} engine disagrees with its graph: " + describe_failure(report),
                )
            component_reports[role] = report
    compile_s = time.perf_counter() - t0
    engine = _open(ctx.out / ENGINE_FILE, provider, options, graph_batches)
    from accel.runtime.pipeline import open_pipeline

    src_dir, out_dir = ctx.input.path, ctx.out
    ref_rt = open_pipeline(
        src_dir, plan, reference, lambda f: OrtRuntime(src_dir / f, optimize=False)
    )
    eng_rt = open_pipeline(
        out_dir, plan, engine, lambda f: _open(out_dir / f, provider, options, graph_batches)
    )
    info = EngineInfo(
        backend="ort",
        engine_file=ENGINE_FILE,
        library_version=ort.__version__,
        precision=ctx.input.info.get("precision", precision),
        device=ctx.target.device,
        batch_range=graph_batches,
        options={"provider": provider, "provider_options": options},
    )
    figures: dict = {"compile_seconds": compile_s}
    if component_reports:
        figures["component_parity"] = component_reports
    verify_engine(
        ctx, info, (reference, engine, plan), config.gate, (ref_rt, plan), (eng_rt, plan),
        tolerance=precision, **figures,
    )  # fmt: skip


STAGE = compile_stage(
    "ort",
    version=2,
    config=OrtConfig,
    consumes="onnx",
    run=run,
    description="compile the ONNX graph into an onnxruntime engine for the target",
)
