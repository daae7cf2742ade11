"""ONNX export of a student's denoiser graph, with the dynamo exporter and a dynamic batch.

The graph is ``DenoiserGraph``: (sample, timestep[, class_labels]) -> x0. After export the batch
axis is read back from the graph (the dynamo exporter can silently keep a requested dynamic axis
static), ``onnx.checker`` runs on the file, and torch, onnxruntime with graph optimisations off and
onnxruntime with them on must agree within the fp32 parity tolerance, or the stage fails. The
sampler plan (timesteps and DDIM coefficients) is written beside the graph.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from accel.core.errors import CheckpointError, StageError
from accel.core.plan import PLAN_FILE
from accel.core.stage import Stage, StageConfig, StageContext

MODEL_FILE = "model.onnx"


class OnnxConfig(StageConfig):
    opset: int = Field(18, ge=18)
    num_inference_steps: int | None = Field(None, ge=1)
    """Steps of the sampler plan; default: the checkpoint's own (a student's accel.json)."""
    guidance_scale: float | None = None
    """Guidance of the sampler plan; default: the checkpoint's (1 for students with it baked in)."""
    parity_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field([1, 3], min_length=1)


def example_inputs(graph, batch: int, timesteps: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for parity checks: Gaussian samples, the given timesteps cycled, labels 0..K-1 cycled."""
    from distill.denoiser import sample_shape

    rng = np.random.default_rng(seed)
    feeds = {
        "sample": rng.standard_normal((batch, *sample_shape(graph.backbone))).astype(np.float32),
        "timestep": np.resize(np.asarray(timesteps, dtype=np.int64), batch),
    }
    if graph.conditional:
        classes = (
            graph.num_labels if graph.guidance_input else graph.backbone.config.num_class_embeds
        )
        feeds["class_labels"] = np.arange(batch, dtype=np.int64) % int(classes or 1)
        if graph.guidance_input:  # after class_labels: the order of DenoiserGraph.forward
            feeds["guidance_scale"] = np.resize(graph.scales.numpy(), batch).astype(np.float32)
    return feeds


def onnx_from_torch(graph, path: Path, opset: int = 18) -> None:
    """Export ``graph`` to ``path`` (plus external data) with a dynamic batch axis on every input."""
    import onnx
    import torch

    feeds = {k: torch.from_numpy(v) for k, v in example_inputs(graph, 2, [500]).items()}
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = {name: {0: batch} for name in feeds}
    graph.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about pytree internals and axis names
        program = torch.onnx.export(
            graph,
            args=(),
            kwargs=feeds,
            dynamo=True,
            opset_version=opset,
            verbose=False,
            input_names=list(feeds),
            output_names=["x0"],
            dynamic_shapes=dynamic,
        )
    program.save(str(path))
    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        if not dim0.dim_param:
            raise StageError(
                "onnx",
                f"the exporter made the batch axis of {value.name!r} static "
                f"({dim0.dim_value}); the graph would accept one batch size only",
            )
    onnx.checker.check_model(str(path))


def run(ctx: StageContext) -> None:
    config: OnnxConfig = ctx.config  # type: ignore[assignment]
    from accel.runtime import OrtRuntime, TorchRuntime
    from distill.denoiser import DenoiserGraph, load_denoiser
    from distill.samplers import sampler_plan
    from export.parity import compare, describe_failure

    denoiser, info = load_denoiser(ctx.input.path, guidance_scale=config.guidance_scale)
    steps = config.num_inference_steps or info.get("num_inference_steps")
    if steps is None:
        raise StageError(
            "onnx",
            f"{ctx.input.path} names no num_inference_steps (not a distilled "
            "student): set num_inference_steps in the onnx stage config",
        )
    graph = DenoiserGraph.of(denoiser)
    plan = sampler_plan(denoiser, steps, info.get("num_classes"))
    t0 = time.perf_counter()
    ctx.progress(
        f"onnx: exporting {type(denoiser.backbone).__name__} (dynamo, opset {config.opset})"
    )
    onnx_from_torch(graph, ctx.out / MODEL_FILE, config.opset)
    export_s = time.perf_counter() - t0
    plan.save(ctx.out / PLAN_FILE)

    timesteps = [s["timestep"] for s in plan.steps]
    feeds = [
        example_inputs(graph, b, timesteps, seed=i) for i, b in enumerate(config.parity_batch_sizes)
    ]
    try:
        others = [
            OrtRuntime(ctx.out / MODEL_FILE, optimize=False),
            OrtRuntime(ctx.out / MODEL_FILE),
        ]
    except CheckpointError as e:
        raise StageError("onnx", f"the exported graph does not load: {e}") from None
    others[0].name += ":no-opt"
    report = compare(TorchRuntime(graph), others, feeds, "fp32")
    if not report["passed"]:
        raise StageError("onnx", "onnxruntime disagrees with torch: " + describe_failure(report))
    ctx.metrics.update(
        export_seconds=export_s,
        parity=report,
        onnx_bytes=sum(p.stat().st_size for p in ctx.out.iterdir()),
    )


STAGE = Stage(
    name="onnx",
    version=1,
    config=OnnxConfig,
    consumes="checkpoint",
    produces="onnx",
    run=run,
    description="export the denoiser graph to ONNX (dynamo), check it, and prove parity with torch",
)
