"""Graph clean-up of an exported ONNX graph with onnxslim: constant folding, dead-node and
identity elimination, shape-computation folding and common-subexpression elimination, done once
offline and in a runtime-neutral way (onnxruntime, TensorRT and OpenVINO all load the result).

Like onnx-ir's passes, the pass proves it changed nothing: the original and the rewritten graph
both run in onnxruntime with its own optimisers off (so onnxruntime cannot hide a bug in the
rewrite), on the student's sampler-plan feeds, within the fp32 parity tolerance; the batch axis
must stay dynamic.
"""

from __future__ import annotations

import time
from collections import Counter

from accel.core.errors import StageError
from accel.core.stage import StageConfig, StageContext
from export.onnx_export import MODEL_FILE, save_graph
from export.onnx_pass import OnnxPass, pass_stage


class OptimizeConfig(StageConfig):
    pass


def run(ctx: StageContext) -> None:
    import onnx
    import onnxslim

    graph_pass = OnnxPass(ctx, "optimize")  # the denoiser; a pipeline's other graphs as they are
    src = ctx.input.path / MODEL_FILE
    model = onnx.load(str(src))
    before = Counter(n.op_type for n in model.graph.node)
    t0 = time.perf_counter()
    ctx.progress(f"optimize: onnxslim on {sum(before.values())} nodes")
    slim = onnxslim.slim(model)
    if slim is None:
        raise StageError("optimize", "onnxslim returned no graph (see its log above)")
    save_graph(slim, ctx.out / MODEL_FILE)
    seconds = time.perf_counter() - t0
    for value in list(slim.graph.input) + list(slim.graph.output):
        if not value.type.tensor_type.shape.dim[0].dim_param:
            raise StageError("optimize", f"onnxslim made the batch axis of {value.name!r} static")
    report = graph_pass.check_parity("denoiser", src, ctx.out / MODEL_FILE, "fp32")
    after = Counter(n.op_type for n in slim.graph.node)
    ctx.metrics.update(
        optimize_seconds=seconds,
        parity=report,
        nodes_before=sum(before.values()),
        nodes_after=sum(after.values()),
        removed={op: before[op] - after[op] for op in before if before[op] > after[op]},
    )
    ctx.info.update({k: v for k, v in ctx.input.info.items() if k in ("precision", "quantizer")})


STAGE = pass_stage(
    "optimize",
    version=1,
    config=OptimizeConfig,
    run=run,
    description="clean up the ONNX graph with onnxslim, with parity against the original",
)
