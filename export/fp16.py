"""FP16 conversion of an exported ONNX graph for GPU targets (Micikevicius et al. 2018, "Mixed
Precision Training": keep in fp32 what fp16's 10-bit mantissa and 65504 range would break).

Model Optimizer's AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``) rewrites the
graph with Cast nodes at the precision boundaries. What stays fp32:

- the graph's inputs and outputs (``keep_io_types``), so runtimes and the sampler plan feed and
  read float32 as before;
- normalisations and softmax (``keep_fp32_ops``): their reductions over many elements lose the
  most in fp16;
- the sampler arithmetic: every node outside the diffusers backbone, i.e. the alpha/sigma tables
  and the x0 conversion of ``DenoiserGraph`` and, in a fused sampler, the per-step updates and
  guidance. The dynamo exporter records each node's module scope
  (``pkg.torch.onnx.name_scopes``), which is how those nodes are found.

The pass proves parity against its fp32 parent with the fp16 row of the tolerance table, and passes
the quality gate. fp16 brings no speed on CPU (../shared/FACTS.md); it is meant for CUDA targets.
"""

from __future__ import annotations

import ast
import re
import shutil
import time

from pydantic import Field

from accel.core.errors import CheckpointError, StageError
from accel.core.plan import PLAN_FILE, SamplerPlan
from accel.core.stage import Stage, StageConfig, StageContext
from export.onnx_export import MODEL_FILE, save_graph
from export.quality_gate import GateConfig, quality_gate

SCOPES = "pkg.torch.onnx.name_scopes"


class Fp16Config(StageConfig):
    keep_fp32_ops: list[str] = Field(
        ["InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax"]
    )
    gate: GateConfig = GateConfig()


def outside_backbone(model) -> list[str]:
    """Names of the nodes that the exporter did not place inside a ``backbone`` module."""
    names = []
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get(SCOPES, "[]"))
        if not any(s.split(".")[-1] == "backbone" for s in scopes):
            names.append(node.name)
    return names


def run(ctx: StageContext) -> None:
    config: Fp16Config = ctx.config  # type: ignore[assignment]
    import logging

    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    from accel.runtime import OrtRuntime
    from export.parity import compare, describe_failure, plan_feeds

    logging.getLogger("modelopt").setLevel(logging.ERROR)
    if ctx.input.info.get("precision") in ("int8", "fp8"):
        raise StageError(
            "fp16",
            "the graph is already quantized; convert to fp16 first, or quantize with "
            'high_precision_dtype = "fp16"',
        )
    src = ctx.input.path / MODEL_FILE
    model = onnx.load(str(src), load_external_data=False)
    if not any(p.key == SCOPES for n in model.graph.node for p in n.metadata_props):
        raise StageError(
            "fp16",
            "the graph carries no module scopes (it was not made by the dynamo exporter, or a "
            "pass dropped them), so the sampler arithmetic cannot be kept in fp32; run fp16 "
            "directly after the onnx stage",
        )
    keep = outside_backbone(model)
    t0 = time.perf_counter()
    ctx.progress(f"fp16: converting; {len(keep)} nodes outside the backbone stay fp32")
    converted = convert_to_mixed_precision(
        str(src),
        "fp16",
        nodes_to_exclude=["^(" + "|".join(map(re.escape, keep)) + ")$"] if keep else None,
        op_types_to_exclude=config.keep_fp32_ops,
        keep_io_types=True,
    )
    # AutoCast's value_info carries the example batch's shapes, which onnxruntime's fusions then
    # trust over the dynamic batch: let the runtime infer shapes itself
    del converted.graph.value_info[:]
    save_graph(converted, ctx.out / MODEL_FILE)
    seconds = time.perf_counter() - t0
    shutil.copy(ctx.input.path / PLAN_FILE, ctx.out / PLAN_FILE)
    plan = SamplerPlan.load(ctx.out / PLAN_FILE)
    try:
        reference = OrtRuntime(src, optimize=False)
        half = OrtRuntime(ctx.out / MODEL_FILE, optimize=False)
    except CheckpointError as e:
        raise StageError("fp16", str(e)) from None
    half.name += ":fp16"
    report = compare(reference, [half], plan_feeds(plan, reference.inputs(), [1, 3]), "fp16")
    if not report["passed"]:
        raise StageError("fp16", "the fp16 graph disagrees with fp32: " + describe_failure(report))
    from accel.runtime.pipeline import copy_pipeline_files, open_pipeline

    copy_pipeline_files(ctx.input.path, ctx.out, plan)  # a pipeline's other graphs: fp32 kept
    src_dir, out_dir = ctx.input.path, ctx.out
    ref_rt = open_pipeline(src_dir, plan, reference, lambda f: OrtRuntime(src_dir / f))
    half_rt = open_pipeline(out_dir, plan, half, lambda f: OrtRuntime(out_dir / f))
    gate = quality_gate("fp16", config.gate, (ref_rt, plan), (half_rt, plan), ctx.progress)
    types = {onnx.TensorProto.FLOAT16: 0, onnx.TensorProto.FLOAT: 0}
    for t in converted.graph.initializer:
        if t.data_type in types:
            types[t.data_type] += 1
    ctx.metrics.update(
        convert_seconds=seconds,
        parity=report,
        quality_gate=gate,
        fp32_nodes_kept=len(keep),
        initializers={
            "fp16": types[onnx.TensorProto.FLOAT16],
            "fp32": types[onnx.TensorProto.FLOAT],
        },
    )
    ctx.info.update(precision="fp16")


STAGE = Stage(
    name="fp16",
    version=1,
    config=Fp16Config,
    consumes="onnx",
    produces="onnx",
    run=run,
    description="convert the ONNX graph to fp16, keeping IO, normalisations and sampler "
    "arithmetic in fp32",
)
