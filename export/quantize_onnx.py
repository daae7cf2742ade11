"""Post-training quantization of an exported ONNX graph: INT8 with onnxruntime, INT8 or FP8 with
NVIDIA Model Optimizer's ONNX PTQ (``modelopt.onnx.quantization.quantize``).

Both insert QuantizeLinear/DequantizeLinear (Q/DQ) pairs (Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"): a tensor x becomes
s * (clip(round(x / s) + z) - z), with scales s from calibration. Runtimes fuse Q/DQ around Conv
and MatMul into integer kernels (onnxruntime's QLinearConv, TensorRT's INT8/FP8 tactics).

Calibration runs on the student's own sampling trajectory: the graph's exact feeds at every step of
its sampler plan (timesteps, guidance's doubled batch or w input, resolution), recorded while the
fp32 graph samples ``calibration_samples`` images. Activation ranges at t = 999 and at the last step
differ by an order of magnitude, which random inputs or a generic calibration set would miss.

Routes:
- ``ort_int8``: ``onnxruntime.quantization.quantize_static`` in QDQ format, static per-tensor INT8
  on Conv/MatMul/Gemm (measured 1.6-1.8x onnxruntime fp32 on AVX-512 VNNI; other op types fail on
  dynamo graphs' shared initialisers, see ../shared/FACTS.md).
- ``modelopt_int8`` / ``modelopt_fp8``: Model Optimizer's ONNX PTQ (entropy/max calibration, Q/DQ
  placement for TensorRT fusions). FP8 Q/DQ (E4M3) run fast only in TensorRT on Hopper/Ada GPUs;
  onnxruntime runs them on CPU for the quality gate, with its graph optimisations off.

The quality gate (``export.quality_gate``) then samples with the quantized and the fp32 graph.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from accel.core.errors import StageError
from accel.core.memory import give_back
from accel.core.plan import PLAN_FILE, SamplerPlan
from accel.core.stage import StageConfig, StageContext
from export.onnx_pass import OnnxPass, pass_stage
from export.quality_gate import GateConfig, Prompts, evaluation_prompts, quality_gate

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


class QuantizeConfig(StageConfig):
    method: Literal["ort_int8", "modelopt_int8", "modelopt_fp8"] = "ort_int8"
    """Quantizer: onnxruntime static INT8 Q/DQ, or Model Optimizer's ONNX PTQ in INT8 or FP8."""
    calibration_samples: int = Field(64, ge=1)
    """Images whose sampling trajectories calibrate the activation ranges."""
    calibration_seed: int = 1000
    """Noise of the calibration trajectories (kept apart from the gate's seeds)."""
    calibration_prompts: Prompts = None
    """Text models: the prompts the calibration trajectories are drawn from, cycled; None: the
    model's evaluation prompts (its accel.json)."""
    calibration_method: Literal["minmax", "entropy"] | None = None
    """How activation ranges come from the calibration data: min/max, or the range minimising
    the KL divergence of the quantized histogram; default: minmax for ort_int8, modelopt's own
    (entropy) for the modelopt methods."""
    activations: Literal["int8", "uint8"] = "uint8"
    """ort_int8 only: unsigned or signed activations. onnxruntime's x86 kernels are written for
    u8 activations x s8 weights (VNNI); s8 x s8 ran 1.3x slower on the demo student."""
    op_types: list[str] | None = None
    """Op types to quantize; default: Conv, MatMul, Gemm for ort_int8, modelopt's own choice."""
    high_precision_dtype: Literal["fp32", "fp16"] = "fp32"
    """modelopt only: the dtype of what stays unquantized (fp16 suits GPU targets)."""
    components: list[Literal["denoiser", "text_encoder", "vae_decoder"]] = Field(
        ["denoiser"], min_length=1
    )
    """A pipeline's graphs to quantize (the others are kept as they are); each calibrates on
    what it sees while the pipeline samples: the denoiser on its step feeds, the text encoder
    on the prompts' token ids, the VAE decoder on the final latents."""
    gate: GateConfig = GateConfig()
    """The quality gate against the unquantized parent (``export.quality_gate.GateConfig``)."""

    @model_validator(mode="after")
    def _options_of_their_method(self) -> QuantizeConfig:
        if self.method == "ort_int8" and self.high_precision_dtype != "fp32":
            raise ValueError("high_precision_dtype applies to the modelopt methods only")
        if self.method != "ort_int8" and "activations" in self.model_fields_set:
            raise ValueError("activations applies to ort_int8 only")
        return self


def calibration_feeds(
    runtime, plan: SamplerPlan, n: int, seed: int, batch: int = 64, prompts=None
) -> list[dict]:
    """The denoiser graph's feeds at every step of ``plan`` while ``runtime`` samples n images."""
    return component_calibration_feeds(runtime, plan, n, seed, batch, prompts)["denoiser"]


def component_calibration_feeds(
    runtime, plan: SamplerPlan, n: int, seed: int, batch: int = 64, prompts=None
) -> dict[str, list[dict]]:
    """Per graph, its feeds while ``runtime`` samples n images with ``plan`` in batches of
    ``batch`` (``target.draw_batch``): the denoiser's at every step and, for a pipeline, the
    text encoder's token ids and the VAE decoder's latents. A text model draws from
    ``prompts``, else its evaluation prompts; with neither it is refused."""
    from accel.runtime import draw

    prompts = evaluation_prompts("quantize", plan, prompts, "calibration_prompts")

    feeds: dict[str, list[dict]] = {"denoiser": [], "text_encoder": [], "vae_decoder": []}
    if plan.components:  # record what the component engines are given
        text, vae = runtime.text, runtime.vae
        runtime.text = _Recorder(text, feeds["text_encoder"])
        runtime.vae = _Recorder(vae, feeds["vae_decoder"])
    try:
        for _ in draw(runtime, plan, n, seed, batch, prompts, on_step=feeds["denoiser"].append):
            pass  # the feeds are the calibration data; the images are not kept
    finally:
        if plan.components:
            runtime.text, runtime.vae = text, vae
    return feeds


class _Recorder:
    """A runtime that notes every feed it is given."""

    def __init__(self, runtime, log: list) -> None:
        self.runtime, self.log, self.name = runtime, log, runtime.name

    def inputs(self):
        return self.runtime.inputs()

    def infer(self, feeds):
        self.log.append(feeds)
        return self.runtime.infer(feeds)


def count_ops(path: Path) -> Counter:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return Counter(node.op_type for node in model.graph.node)


def quiet_modelopt() -> None:
    """Model Optimizer's loggers at ERROR: its ONNX packages set each of their loggers to INFO,
    with a handler on the stdout of the moment, when they are imported, so the parent logger's
    level alone does not silence them. Call after importing them."""
    import logging

    for name in ["modelopt", *logging.root.manager.loggerDict]:
        if name.split(".")[0] == "modelopt":
            logging.getLogger(name).setLevel(logging.ERROR)


def uses_external_data(path: Path) -> bool:
    """The ONNX file at ``path`` keeps some initializer in an external data file."""
    import onnx
    from onnx.external_data_helper import uses_external_data as external

    model = onnx.load(str(path), load_external_data=False)
    return any(external(t) for t in model.graph.initializer)


def quantize_ort_int8(
    src: Path,
    dst: Path,
    feeds: list[dict],
    op_types: list[str],
    method: str | None,
    activations: str = "uint8",
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    extra: dict = {}
    if method != "entropy":  # min/max ranges from our own pass, handed over as a cache file
        cache = src.with_name(f".{src.name}.calibration.json")
        ranges = minmax_ranges(src, feeds, op_types)
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
        extra = {"calibration_data_reader": None, "calibration_cache_path": str(cache)}
    else:
        extra = {"calibration_data_reader": Reader()}
    quantize_static(
        str(src),
        str(dst),
        # graphs over protobuf's 2 GB (an SD UNet) keep their weights in external data
        use_external_data_format=uses_external_data(src),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=op_types,
        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=(
            CalibrationMethod.Entropy if method == "entropy" else CalibrationMethod.MinMax
        ),
        **extra,
    )


def minmax_ranges(
    path: Path, feeds: list[dict], op_types: list[str]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each activation's (min, max) over ``feeds``: the float inputs and outputs of the
    ``op_types`` nodes, as onnxruntime's MinMax calibrator selects them, reduced in the graph
    (ReduceMin/ReduceMax outputs added) and merged feed by feed, so that no activation is kept.
    The augmented graph is written beside ``path`` and reads its weights from ``path``'s own
    external data file. onnxruntime's ``quantize_static`` calibrator holds a deep copy of the
    model, saves it, loads it again and saves the augmented one: 21.9 GB for SD1.5's 3.4 GB UNet
    on a 24 GB machine, where this pass peaks at the session's own size."""
    import onnx
    import onnxruntime as ort

    inferred = path.with_name(f".{path.name}.inferred")
    augmented = path.with_name(f".{path.name}.augmented")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred))  # types for the choice
        model = onnx.load(str(inferred), load_external_data=False)
        graph = model.graph
        types = {v.name: v.type for v in [*graph.value_info, *graph.output, *graph.input]}
        weights = {t.name for t in graph.initializer}
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
        tensors = sorted(
            {
                name
                for node in graph.node
                if node.op_type in op_types
                for name in [*node.input, *node.output]
                if name in types
                and name not in weights
                and types[name].HasField("tensor_type")
                and types[name].tensor_type.elem_type in floats
            }
        )
        if not tensors:  # no node of op_types: nothing to quantize (the caller says so)
            return {}
        outputs = []
        for name in tensors:
            for op in ("ReduceMin", "ReduceMax"):
                out = f"{name}.accel_{op}"
                graph.node.append(onnx.helper.make_node(op, [name], [out], keepdims=1))
                graph.output.append(
                    onnx.helper.make_tensor_value_info(out, types[name].tensor_type.elem_type, None)
                )
                outputs.append(out)
        del graph.value_info[:]
        onnx.save(model, str(augmented))  # the weights stay references into path's data file
        del model, graph
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(augmented), options, providers=["CPUExecutionProvider"])
        lo: dict[str, np.ndarray] = {}
        hi: dict[str, np.ndarray] = {}
        for feed in feeds:
            values = session.run(outputs, feed)
            for name, low, high in zip(tensors, values[::2], values[1::2], strict=True):
                low, high = (
                    low.reshape(-1)[:1].astype(np.float32),
                    high.reshape(-1)[:1].astype(np.float32),
                )
                lo[name] = np.fmin(lo[name], low) if name in lo else low
                hi[name] = np.fmax(hi[name], high) if name in hi else high
        del session
    finally:
        inferred.unlink(missing_ok=True)
        augmented.unlink(missing_ok=True)
        give_back()
    return {name: (lo[name], hi[name]) for name in tensors}


def quantize_modelopt(
    src: Path,
    dst: Path,
    feeds: list[dict],
    mode: str,
    op_types: list[str] | None,
    dtype: str,
    method: str | None,
) -> None:
    """Model Optimizer's ONNX PTQ, in a child process: it patches onnxruntime's calibrators and
    quantizer in place, which would break ``ort_int8`` (and any calibration) later in this one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # modelopt's calibration takes one array per input: the trajectory's steps, stacked
    data = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        calibration = {"minmax": "max", "entropy": "entropy", None: None}[method]
        child.submit(
            _modelopt_onnx_ptq, src, dst, data, mode, op_types, dtype, calibration
        ).result()


def _modelopt_onnx_ptq(
    src: Path,
    dst: Path,
    data: dict,
    mode: str,
    op_types: list[str] | None,
    dtype: str,
    calibration: str | None,
) -> None:
    import modelopt.onnx.quantization as moq

    quiet_modelopt()
    moq.quantize(
        str(src),
        quantize_mode=mode,
        calibration_data=data,
        calibration_method=calibration,
        calibration_eps=["cpu"],
        op_types_to_quantize=op_types,
        high_precision_dtype=dtype,
        output_path=str(dst),
        log_level="ERROR",
    )


def run(ctx: StageContext) -> None:
    config: QuantizeConfig = ctx.config  # type: ignore[assignment]

    plan = SamplerPlan.load(ctx.input.path / PLAN_FILE)
    if plan.fused:
        raise StageError(
            "quantize",
            "this is a fused-sampler graph; quantize the per-step graph (calibration replays its "
            "steps), or export the fused sampler from a quantize_torch student",
        )
    graph_pass = OnnxPass(ctx, "quantize", config.components)
    parent, _ = graph_pass.pipeline(ctx.input.path)
    ctx.progress(
        f"quantize: calibrating {config.method} of the {', '.join(config.components)} on the "
        f"sampling of {config.calibration_samples} images ({len(plan.steps)} steps each)"
    )
    feeds_of = component_calibration_feeds(
        parent,
        plan,
        config.calibration_samples,
        config.calibration_seed,
        ctx.target.draw_batch,
        config.calibration_prompts,
    )
    # the fp32 sessions are closed while the quantizer runs: it loads the graph, an augmented
    # copy and a session of that copy itself (an SD1.5 UNet is 3.4 GB each); the gate reopens them
    del parent
    gc.collect()
    t0 = time.perf_counter()
    qdq: dict[str, int] = {}
    for component in config.components:
        file = graph_pass.files[component]
        names = graph_inputs(ctx.input.path / file)
        feeds = [{k: v for k, v in f.items() if k in names} for f in feeds_of[component]]
        ops = quantize_graph(ctx.input.path, ctx.out, file, feeds, config)
        if not all(ops[op] for op in QDQ_OPS):
            raise StageError(
                "quantize",
                f"{config.method} inserted no Q/DQ nodes in the {component} (op types asked: "
                f"{config.op_types}); check op_types against the graph's op types",
            )
        qdq[component] = ops[QDQ_OPS[0]]
    quantize_s = time.perf_counter() - t0
    fp8 = config.method == "modelopt_fp8"
    try:  # FP8 Q/DQ: onnxruntime's CPU optimisers cannot fold them
        quantized, _ = graph_pass.pipeline(ctx.out, optimize=not fp8)
    except StageError as e:
        raise StageError("quantize", f"the quantized graph does not load: {e.message}") from None
    parent, _ = graph_pass.pipeline(ctx.input.path)
    gate = quality_gate(
        "quantize",
        config.gate,
        (parent, plan),
        (quantized, plan),
        ctx.progress,
        batch=ctx.target.draw_batch,
    )
    ctx.metrics.update(quantize_seconds=quantize_s, quality_gate=gate, qdq_nodes=sum(qdq.values()))
    ctx.info.update(
        precision="fp8" if fp8 else "int8",
        quantizer=config.method,
        calibration_feeds=len(feeds_of["denoiser"]),
    )
    if plan.components:
        ctx.info["quantized_components"] = list(config.components)


def graph_inputs(path: Path) -> set[str]:
    """The input names of an ONNX graph, read without its weights or a session."""
    import onnx

    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}


def quantize_graph(src_dir: Path, out_dir: Path, file: str, feeds: list[dict], config) -> Counter:
    """Quantize ``src_dir / file`` into ``out_dir / file`` (with its external data), in a scratch
    directory (quantizers write scratch files beside their inputs and into the working
    directory); the quantized graph's op counts."""
    import onnx

    src_dir, out_dir = src_dir.resolve(), out_dir.resolve()  # the scratch directory is the cwd
    with tempfile.TemporaryDirectory(prefix="accel-quantize-") as tmp:
        cwd = Path(tmp) / "cwd"  # empty: onnxruntime checks the output's external data file
        cwd.mkdir()  # name against the working directory, where the input's would be found
        with contextlib.chdir(cwd):
            _quantize_in(Path(tmp), src_dir, out_dir, file, feeds, config)
    onnx.checker.check_model(str(out_dir / file))
    return count_ops(out_dir / file)


def _quantize_in(tmp: Path, src_dir: Path, out_dir: Path, file: str, feeds: list[dict], config):
    scratch = tmp / file
    for f in src_dir.glob(file + "*"):  # the graph and its external data
        shutil.copy(f, tmp / f.name)
    out = tmp / "quantized" / file
    out.parent.mkdir()
    try:
        if config.method == "ort_int8":
            quantize_ort_int8(
                scratch,
                out,
                feeds,
                config.op_types or ["Conv", "MatMul", "Gemm"],
                config.calibration_method,
                config.activations,
            )
        else:
            quantize_modelopt(
                scratch,
                out,
                feeds,
                config.method.removeprefix("modelopt_"),
                config.op_types,
                config.high_precision_dtype,
                config.calibration_method,
            )
    except ImportError as e:
        raise StageError(
            "quantize", f"{config.method} needs a package that is not installed: {e}"
        ) from None
    for f in out.parent.iterdir():
        shutil.move(f, out_dir / f.name)


STAGE = pass_stage(
    "quantize",
    version=1,
    config=QuantizeConfig,
    run=run,
    description="INT8/FP8 post-training quantization of the ONNX graph, calibrated on its own "
    "sampling trajectory, behind a quality gate",
)
