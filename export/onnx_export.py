"""ONNX export of a student's denoiser graph, with the dynamo exporter and a dynamic batch.

The graph is ``DenoiserGraph``: (sample, timestep[, class_labels]) -> x0. After export the batch
axis is read back from the graph (the dynamo exporter can silently keep a requested dynamic axis
static), ``onnx.checker`` runs on the file, and torch, onnxruntime with graph optimisations off and
onnxruntime with them on must agree within the fp32 parity tolerance, or the stage fails. The
sampler plan (timesteps and DDIM coefficients) is written beside the graph.
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from accel.core.errors import CheckpointError, StageError
from accel.core.plan import PLAN_FILE
from accel.core.stage import Stage, StageConfig, StageContext, say

MODEL_FILE = "model.onnx"


class OnnxConfig(StageConfig):
    opset: int = Field(18, ge=18)
    """ONNX opset of the exported graphs (18 or later)."""
    num_inference_steps: int | None = Field(None, ge=1)
    """Steps of the sampler plan; default: the checkpoint's own (a student's accel.json)."""
    guidance_scale: float | None = None
    """Guidance of the sampler plan; default: the checkpoint's (1 for students with it baked in)."""
    resolution: list[Annotated[int, Field(ge=8)]] | None = Field(None, min_length=2, max_length=2)
    """[height, width] in pixels a text-to-image pipeline's graphs are exported for (its plan's
    latents, Flux's position ids); default: the pipeline's own (its stock pipeline's default)."""
    parity_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field([1, 3], min_length=1)
    """Batch sizes of the torch vs onnxruntime parity check."""
    fused_sampler: bool = False
    """Export the whole sampler (every step, guidance, coefficients) as one graph:
    noise [, class_labels, step_noise] -> images (``export.fused_sampler``)."""


def example_inputs(
    graph, batch: int, timesteps: list[int], seed: int = 0, resolution: int | None = None
) -> dict[str, np.ndarray]:
    """Feeds for parity checks: Gaussian samples (at ``resolution``, default the model's own),
    the given timesteps cycled, labels 0..K-1 cycled."""
    from distill.denoiser import sample_shape

    rng = np.random.default_rng(seed)
    c, h, w = sample_shape(graph.backbone)
    h, w = (resolution, resolution) if resolution else (h, w)
    feeds = {
        "sample": rng.standard_normal((batch, c, h, w)).astype(np.float32),
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


def _by_name(graph, names: list[str]):
    """``graph`` called by keyword from positional inputs in ``names`` order (graphs with
    conditioning by name take it as keywords; the TorchScript exporter passes inputs by
    position, and torch.export takes static shapes only outside ``**kwargs``)."""
    import torch

    class ByName(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wrapped = graph  # not ``graph``: torch.export's modules have an fx ``graph``

        def forward(self, *args):
            return self.wrapped(**dict(zip(names, args, strict=True)))

    return ByName().eval()


def onnx_from_torch(
    graph,
    path: Path,
    opset: int = 18,
    dynamo: bool = True,
    inputs: dict[str, np.ndarray] | None = None,
    output: str | list[str] = "x0",
    spatial: tuple[int, int, int] | None = None,
    unbatched: Collection[str] = (),
    optimize: bool = True,
    max_batch: int = 1024,
) -> None:
    """Export ``graph`` to ``path`` (plus external data) with a dynamic batch axis on every input
    but the ``unbatched`` ones (inputs shared by the batch: Flux's position ids) and, with
    ``spatial`` = (min, max, multiple), dynamic height and width (the last two axes of every
    image input) in [min, max], multiples of ``multiple``. ``inputs`` are example feeds
    (default: a DenoiserGraph's). ``dynamo=False`` takes the TorchScript exporter, the one that
    exports Model Optimizer's quantized modules (the dynamo exporter trips on their
    data-dependent guards); it supports the dynamic batch only. ``optimize=False`` skips the
    dynamo exporter's onnxscript optimiser (it drops DC-AE's ``+ 1e-15`` before a division
    that is 0 / 0 without it: NaN in onnxruntime). ``max_batch`` bounds the dynamo exporter's
    batch dimension (``batch_bound`` reads the bound a failed export's guard asks for)."""
    import onnx
    import torch

    inputs = example_inputs(graph, 2, [500]) if inputs is None else inputs
    outputs = [output] if isinstance(output, str) else list(output)
    feeds = {k: torch.from_numpy(v) for k, v in inputs.items()}
    images = [k for k, v in feeds.items() if v.dim() >= 4]
    graph.eval()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed"
    # a failed torch.export logs its guard traceback before raising: the caller reports it
    logging.getLogger("torch._guards").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about pytree internals and axis names
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=max_batch)
            dims: dict[str, dict | None] = {
                name: None if name in unbatched else {0: batch} for name in feeds
            }
            if spatial:
                lo, hi, k = spatial
                h = torch.export.Dim(f"h{k}", min=lo // k, max=hi // k)
                w = torch.export.Dim(f"w{k}", min=lo // k, max=hi // k)
                for name in images:
                    n = feeds[name].dim()
                    dims[name].update({n - 2: k * h, n - 1: k * w})
            params = inspect.signature(graph.forward).parameters
            var_kw = [n for n, p in params.items() if p.kind is p.VAR_KEYWORD]
            extra = [k for k in dims if k not in params]
            module: Any = graph
            args: tuple = ()
            kwargs: dict | None = feeds
            if var_kw and extra:  # conditioning by name: captured by torch.export ourselves,
                # by position (its shape specs nested under **kwargs fail on static shapes, and
                # torch.onnx's own capture of PixArt's graph mis-infers the batch of a reshape)
                args = tuple(feeds.values())
                module = torch.export.export(
                    _by_name(graph, list(feeds)), args, dynamic_shapes=(tuple(dims.values()),)
                )
                kwargs, dims = None, None  # type: ignore[assignment]
            program = torch.onnx.export(
                module,
                args=args,
                kwargs=kwargs,
                dynamo=True,
                opset_version=opset,
                verbose=False,
                input_names=list(feeds),
                output_names=outputs,
                dynamic_shapes=dims,
                optimize=optimize,
            )
            program.save(str(path))
            _forget(program)
            del program
        else:
            axes: dict[str, dict[int, str]] = {
                name: {0: "batch"} for name in [*feeds, *outputs] if name not in unbatched
            }
            if spatial:
                for name in images:
                    n = feeds[name].dim()
                    axes[name].update({n - 2: "height", n - 1: "width"})

            torch.onnx.export(
                _by_name(graph, list(feeds)),
                args=tuple(feeds.values()),
                f=str(path),
                dynamo=False,
                opset_version=min(opset, 20),  # the TorchScript exporter's newest
                input_names=list(feeds),
                output_names=outputs,
                dynamic_axes=axes,
            )
    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name in unbatched:
            continue
        dims = value.type.tensor_type.shape.dim
        wanted = {0: "batch"}
        if spatial and len(dims) >= 4:
            wanted.update({len(dims) - 2: "height", len(dims) - 1: "width"})
        for axis, what in wanted.items():
            if not dims[axis].dim_param:
                raise StageError(
                    "onnx",
                    f"the exporter made the {what} axis of {value.name!r} static "
                    f"({dims[axis].dim_value}); the graph would accept one {what} only",
                )
    onnx.checker.check_model(str(path))


def _forget(program) -> None:
    """Let the module's weights go once ``program`` is saved. The exported graph's values wrap
    the module's parameters (``TorchTensor``), and onnxscript's rewrite rules, module-level
    objects, keep the last graph and match they saw (``SimplePatternMatcher``): without this,
    half of a UNet's weights outlive the module's release (``export_component``) and a 3.4 GB
    UNet is held twice once onnxruntime opens its graph."""
    import gc

    for value in program.model.graph.initializers.values():
        value.const_value = None
    try:  # private; where it moves, the initializers above are still let go
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for name in ("_graph", "_current_node", "_match", "_tracer"):
                if name in vars(obj):
                    setattr(obj, name, None)


def batch_bound(error: BaseException) -> int | None:
    """The largest batch a failed dynamo export's guard allows, where that is why it failed:
    diffusers' ``Upsample2D`` makes its input contiguous from batch 64 on (a copy, the same
    values), so torch.export proves batch <= 63 and refuses a wider range. The graph it exports
    under that bound computes the same for any batch."""
    import re

    while error is not None:
        pattern = r"Constraints violated \(batch\).*?size\(\)\[0\] <= (\d+)"
        found = re.search(pattern, str(error), re.S)
        if found:
            return int(found.group(1))
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return None


def save_graph(model, path: Path) -> None:
    """Save a rewritten ModelProto (weights in ``<name>.data`` above 1 GiB, protobuf's limit being
    2 GiB) and run the checker on the file."""
    import onnx

    large = sum(t.ByteSize() for t in model.graph.initializer) > (1 << 30)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
    )
    onnx.checker.check_model(str(path))


def plan_defaults(
    stage: str,
    path: Path,
    steps: int | None,
    guidance: float | None,
    progress: Callable[[str], None] = say,
) -> tuple[int, float | None]:
    """The step count and guidance of the plan, before any weights load: as given; else a
    distilled student's own (its accel.json); else, for a teacher, what its stock pipeline class
    samples with by default (``pipe(prompt)``: 50 steps and w 7.5 for StableDiffusionPipeline),
    said in one progress line. A StageError naming the option when none is known."""
    from accel.core.model_info import ModelInfo
    from distill.models import stock_defaults

    if steps is not None:
        return steps, guidance
    try:
        info = ModelInfo.read(path)
    except CheckpointError as e:
        raise StageError(stage, str(e)) from None
    if info.num_inference_steps is not None:
        return info.num_inference_steps, guidance
    cls, stock_steps, stock_guidance = stock_defaults(path)
    if stock_steps is None:
        raise StageError(
            stage,
            "this checkpoint is not a distilled student (its accel.json names no step count) and "
            f"its pipeline class {cls or '(none in model_index.json)'} names no default: set "
            f"num_inference_steps (--num-inference-steps on the command line)",
        )
    if guidance is None and info.guidance_scale is None:
        guidance = stock_guidance
    shown = "the model's own guidance" if guidance is None else f"guidance {guidance:g}"
    progress(
        f"{stage}: a teacher, not a distilled student: its sampler plan takes {cls}'s "
        f"defaults, {stock_steps} steps and {shown} (set --num-inference-steps and "
        "--guidance-scale to choose)"
    )
    return stock_steps, guidance


def graph_and_plan(
    stage: str,
    path: Path,
    steps: int | None,
    guidance: float | None,
    resolution: list[int] | None = None,
    progress: Callable[[str], None] = say,
):
    """The checkpoint's DenoiserGraph and its sampler plan for ``steps`` and ``guidance``
    (defaults: ``plan_defaults``) and a pipeline's ``resolution`` ([height, width]; default: its
    own)."""
    from distill.checkpoint import load_denoiser
    from distill.graph import DenoiserGraph
    from distill.samplers import sampler_plan

    steps, guidance = plan_defaults(stage, path, steps, guidance, progress)
    denoiser, info = load_denoiser(path, guidance_scale=guidance)
    if resolution is not None and denoiser.adapter.pixel:
        raise StageError(stage, "resolution applies to text-to-image pipelines only")
    size = None if resolution is None else (resolution[0], resolution[1])
    return DenoiserGraph.of(denoiser), sampler_plan(denoiser, steps, info, size)


class _Replay:
    """An rng stand-in that hands ``accel.runtime.sample`` the fused graph's step noise in order."""

    def __init__(self, step_noise: np.ndarray | None) -> None:
        self.draws = iter([] if step_noise is None else np.moveaxis(step_noise, 1, 0))

    def standard_normal(self, shape, dtype=np.float32) -> np.ndarray:
        return next(self.draws)


class PerStepLoop:
    """The per-step loop (``accel.runtime.sample`` over the step graph) as a runtime that takes a
    fused graph's feeds: the reference a fused sampler must reproduce."""

    def __init__(self, runtime, plan) -> None:
        self.runtime, self.plan, self.name = runtime, plan, f"per-step loop ({runtime.name})"

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from accel.runtime import sample

        images = sample(
            self.runtime,
            self.plan,
            feeds["noise"],
            feeds.get("class_labels"),
            _Replay(feeds.get("step_noise")),  # type: ignore[arg-type]
        )
        return {"images": images}


def onnx_parity(
    path: Path, reference, feeds: list[dict], extra: list | None = None, then=None
) -> dict:
    """torch against onnxruntime with its graph optimisations off and on (and ``extra``
    runtimes), fp32 tolerances; StageError on any disagreement. ``then`` is called once the
    reference's outputs are computed, before any onnxruntime session opens."""
    from accel.runtime import OrtRuntime
    from export.parity import compare, describe_failure

    def opened(optimize: bool):
        def open_session():
            try:
                runtime = OrtRuntime(path, optimize=optimize)
            except CheckpointError as e:
                raise StageError("onnx", f"the exported graph does not load: {e}") from None
            runtime.name += "" if optimize else ":no-opt"
            return runtime

        return open_session

    runtimes = [opened(False), opened(True), *(extra or [])]
    report = compare(reference, runtimes, feeds, "fp32", then=then)
    if not report["passed"]:
        raise StageError("onnx", "the runtimes disagree: " + describe_failure(report))
    return report


def export_fused(ctx: StageContext, config: OnnxConfig, graph, plan, spatial, resolutions) -> None:
    from dataclasses import replace

    from export.fused_sampler import FusedSampler, example_feeds
    from export.torch_runtime import TorchRuntime

    fused_plan = replace(plan, fused=True, graph_output="images")
    sampler = FusedSampler(graph, fused_plan).eval()
    t0 = time.perf_counter()
    ctx.progress(
        f"onnx: exporting the fused {len(plan.steps)}-step sampler (dynamo, opset {config.opset})"
    )
    onnx_from_torch(
        sampler,
        ctx.out / MODEL_FILE,
        config.opset,
        inputs=example_feeds(sampler, 2),
        output="images",
        spatial=spatial,
    )
    export_s = time.perf_counter() - t0
    fused_plan.save(ctx.out / PLAN_FILE)
    feeds = [
        example_feeds(sampler, b, seed=i, resolution=r)
        for i, b in enumerate(config.parity_batch_sizes)
        for r in resolutions
    ]
    loop = PerStepLoop(TorchRuntime(graph), plan)
    report = onnx_parity(ctx.out / MODEL_FILE, TorchRuntime(sampler), feeds, [loop])
    ctx.metrics.update(
        export_seconds=export_s,
        parity=report,
        onnx_bytes=sum(p.stat().st_size for p in ctx.out.iterdir()),
    )
    ctx.info.update(fused_sampler=True, steps=len(plan.steps))


def spatial_range(target, graph) -> tuple[int, int, int] | None:
    """(min, max, multiple) of the target's resolution profile when it spans a range, None for a
    single resolution. A UNet halves the resolution once per down block but the last, so height
    and width must be multiples of 2^(blocks - 1)."""
    r = target.shapes.resolution
    if r.min == r.max:
        return None
    blocks = getattr(getattr(graph.backbone, "config", None), "down_block_types", None)
    if not blocks:
        raise StageError(
            "onnx",
            f"target {target.name!r} asks for resolutions {r.min}..{r.max}, and dynamic resolution "
            f"is supported for UNets only, not {type(graph.backbone).__name__}; use a target with "
            "one resolution",
        )
    k = 2 ** (len(blocks) - 1)
    if r.min % k or r.max % k:
        raise StageError(
            "onnx",
            f"target {target.name!r} asks for resolutions {r.min}..{r.max}, but this UNet needs "
            f"multiples of {k}; set the target's resolution min and max to multiples of {k}",
        )
    return r.min, r.max, k


def run(ctx: StageContext) -> None:
    config: OnnxConfig = ctx.config  # type: ignore[assignment]
    from export.torch_runtime import TorchRuntime

    graph, plan = graph_and_plan(
        "onnx", ctx.input.path, config.num_inference_steps, config.guidance_scale,
        config.resolution, ctx.progress,
    )  # fmt: skip
    spatial = spatial_range(ctx.target, graph)
    resolutions = [None] if spatial is None else [spatial[0], spatial[1]]
    if spatial:
        ctx.info["resolution_range"] = list(spatial[:2])
    if not graph.adapter.pixel:  # a pipeline: text encoder, denoiser, VAE decoder
        from export.pipeline_export import export_pipeline

        export_pipeline(ctx, config, graph, plan, spatial)
        return
    if config.fused_sampler:
        export_fused(ctx, config, graph, plan, spatial, resolutions)
        return
    t0 = time.perf_counter()
    ctx.progress(f"onnx: exporting {type(graph.backbone).__name__} (dynamo, opset {config.opset})")
    onnx_from_torch(graph, ctx.out / MODEL_FILE, config.opset, spatial=spatial)
    export_s = time.perf_counter() - t0
    plan.save(ctx.out / PLAN_FILE)

    timesteps = [s.timestep for s in plan.steps]
    feeds = [
        example_inputs(graph, b, timesteps, seed=i, resolution=r)
        for i, b in enumerate(config.parity_batch_sizes)
        for r in resolutions
    ]
    report = onnx_parity(ctx.out / MODEL_FILE, TorchRuntime(graph), feeds)
    ctx.metrics.update(
        export_seconds=export_s,
        parity=report,
        onnx_bytes=sum(p.stat().st_size for p in ctx.out.iterdir()),
    )


STAGE = Stage(
    name="onnx",
    version=3,  # 3: diffusers UNets export with dynamo (batch <= 63), not TorchScript
    config=OnnxConfig,
    consumes="checkpoint",
    produces="onnx",
    run=run,
    target_specific=True,  # its dynamic axes come from the target's shape profile
    description="export the denoiser graph (and a pipeline's text encoder and VAE decoder) to "
    "ONNX, check it, and prove parity with torch",
    requires=(),
)
