"""Quantization of the torch student with NVIDIA Model Optimizer, then export to a Q/DQ ONNX graph.

``mtq.quantize(model, config, forward_loop)`` inserts fake quantizers around every Linear and Conv,
runs ``forward_loop`` to calibrate their ranges and returns the model; Model Optimizer's configs:

- ``int8_smoothquant`` (``INT8_SMOOTHQUANT_CFG``): SmoothQuant (Xiao et al. 2023, "SmoothQuant:
  Accurate and Efficient Post-Training Quantization for Large Language Models") migrates activation
  outliers into the weights with a per-channel scale s, X W = (X diag(s)^-1)(diag(s) W),
  s_j = max|X_j|^a / max|W_j|^(1-a), then INT8 weights (per channel) and activations (per tensor);
- ``int8`` (``INT8_DEFAULT_CFG``): the same INT8 without smoothing;
- ``fp8`` (``FP8_DEFAULT_CFG``): FP8 E4M3 weights and activations (Micikevicius et al. 2022, "FP8
  Formats for Deep Learning"), per-tensor amax scaling.

The forward loop replays the student's own sampling trajectory (``export.quantize_onnx``'s
``calibration_feeds``): every step's exact feeds at the plan's timesteps and guidance.

Export uses the TorchScript exporter, the route Model Optimizer's quantized modules support
(``dynamo=True`` fails on their data-dependent guards, ../shared/FACTS.md). INT8 becomes standard
QuantizeLinear/DequantizeLinear and runs in onnxruntime. FP8 becomes TensorRT's custom-domain
``trt::TRT_FP8QuantizeLinear`` / ``TRT_FP8DequantizeLinear``, which only TensorRT runs: its quality
gate therefore samples with the fake-quantized torch model, which computes the same rounding.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from typing import Literal

from pydantic import Field

from accel.core.errors import CheckpointError, StageError
from accel.core.plan import PLAN_FILE
from accel.core.stage import Stage, StageConfig, StageContext
from export.onnx_export import MODEL_FILE
from export.quality_gate import GateConfig, quality_gate

CONFIGS = {
    "int8_smoothquant": "INT8_SMOOTHQUANT_CFG",
    "int8": "INT8_DEFAULT_CFG",
    "fp8": "FP8_DEFAULT_CFG",
}
FP8_OPS = ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear")
INT8_OPS = ("QuantizeLinear", "DequantizeLinear")


class TorchQuantizeConfig(StageConfig):
    method: Literal["int8_smoothquant", "int8", "fp8"] = "int8_smoothquant"
    """Model Optimizer's mtq.quantize config: INT8 with SmoothQuant, plain INT8, or FP8."""
    num_inference_steps: int | None = Field(None, ge=1)
    """Steps of the sampler plan; default: the checkpoint's own (a student's accel.json)."""
    guidance_scale: float | None = None
    """Guidance of the sampler plan; default: the checkpoint's."""
    calibration_samples: int = Field(64, ge=1)
    """Images whose sampling trajectories calibrate the activation ranges."""
    calibration_seed: int = 1000
    """Seed of the calibration noise (apart from the gate's seeds)."""
    opset: int = Field(18, ge=18, le=20)
    """ONNX opset of the exported quantized graph (the TorchScript exporter: 18 to 20)."""
    gate: GateConfig = GateConfig()
    """The quality gate against the unquantized student (``export.quality_gate.GateConfig``)."""


def quantized_op_counts(path) -> Counter:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return Counter(
        f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        for node in model.graph.node
    )


def run(ctx: StageContext) -> None:
    config: TorchQuantizeConfig = ctx.config  # type: ignore[assignment]

    import torch

    from accel.runtime import OrtRuntime
    from export.onnx_export import graph_and_plan, onnx_from_torch
    from export.quantize_onnx import calibration_feeds, quiet_modelopt
    from export.torch_runtime import TorchRuntime

    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise StageError(
            "quantize_torch",
            f"NVIDIA Model Optimizer is not installed ({e}): pip install nvidia-modelopt",
        ) from None
    quiet_modelopt()

    graph, plan = graph_and_plan(
        "quantize_torch", ctx.input.path, config.num_inference_steps, config.guidance_scale
    )
    parent = TorchRuntime(graph)
    ctx.progress(
        f"quantize_torch: calibrating {config.method} on the sampling trajectories of "
        f"{config.calibration_samples} images ({len(plan.steps)} steps each)"
    )
    feeds = calibration_feeds(
        parent, plan, config.calibration_samples, config.calibration_seed, ctx.target.draw_batch
    )

    quantized = copy.deepcopy(graph)  # the reference keeps its fp32 weights

    def forward_loop(model) -> None:
        with torch.no_grad():
            for f in feeds:
                TorchRuntime(model).infer(f)

    t0 = time.perf_counter()
    quantized = mtq.quantize(quantized.eval(), getattr(mtq, CONFIGS[config.method]), forward_loop)
    quantize_s = time.perf_counter() - t0
    ctx.progress(f"quantize_torch: exporting the {config.method} graph (TorchScript exporter)")
    onnx_from_torch(quantized, ctx.out / MODEL_FILE, config.opset, dynamo=False)
    plan.save(ctx.out / PLAN_FILE)

    ops = quantized_op_counts(ctx.out / MODEL_FILE)
    fp8 = config.method == "fp8"
    expected = FP8_OPS if fp8 else INT8_OPS
    if not all(ops[("trt::" if fp8 else "") + op] for op in expected):
        raise StageError(
            "quantize_torch",
            f"the exported graph has no {'/'.join(expected)} nodes; Model Optimizer quantized "
            "nothing in this model",
        )
    if fp8:  # FP8 Q/DQ run only in TensorRT: gate on the fake-quantized torch model
        candidate, gate_runtime = TorchRuntime(quantized), "torch fake-quant (FP8 runs in TensorRT)"
    else:
        try:
            candidate, gate_runtime = OrtRuntime(ctx.out / MODEL_FILE), "onnxruntime"
        except CheckpointError as e:
            raise StageError("quantize_torch", f"the quantized graph does not load: {e}") from None
    gate = quality_gate(
        "quantize_torch",
        config.gate,
        (parent, plan),
        (candidate, plan),
        ctx.progress,
        batch=ctx.target.draw_batch,
    )
    gate["runtime"] = gate_runtime
    ctx.metrics.update(
        quantize_seconds=quantize_s,
        quality_gate=gate,
        qdq_nodes=ops[("trt::" if fp8 else "") + expected[0]],
    )
    ctx.info.update(
        precision="fp8" if fp8 else "int8",
        quantizer=f"modelopt.torch:{CONFIGS[config.method]}",
        calibration_feeds=len(feeds),
    )


STAGE = Stage(
    name="quantize_torch",
    version=1,
    config=TorchQuantizeConfig,
    consumes="checkpoint",
    produces="onnx",
    run=run,
    description="INT8 (SmoothQuant) or FP8 quantization of the torch student with Model Optimizer, "
    "exported as a Q/DQ ONNX graph, behind a quality gate",
)
