"""Compile a student into a torch engine for one target: its fused few-step sampler
(``export.fused_sampler``: every step, guidance and, for a latent pipeline, the VAE decode, with
the text encoders outside and their embeddings cached per prompt) under ``torch.compile`` and, on
CUDA targets, replayed from one CUDA graph per shape bucket (``export.torch_engines``).

The engine artifact holds the student checkpoint (``checkpoint/``, safetensors and configs), the
fused sampler plan and the engine description; the compiled kernels live in the store's inductor
cache (``cache/torch-compile/<target fingerprint>-torch<version>``), which the build fills for
the target's optimal batch and single-stream batch, and which the runtime reuses when it opens
the engine from the same store (elsewhere inductor compiles on first use). The build is gated on
image quality against eager fp32, like every compile stage.

Options (the engine description's ``options``): ``mode``, torch.compile's: "default", or
"max-autotune-no-cudagraphs" when the target's builder optimization level is 4 or 5 (TensorRT's
levels that search more tactics; the CUDA graph is accel's own, so inductor's is off);
``cuda_graph``: true on CUDA targets unless the stage turns it off; ``opt_batch`` and the target's
fingerprint (its inductor cache in the store).

These engines need torch: they run in accel's own process (``accel sample``, ``accel profile``,
a Python server), not in a bundle for torch-free runtimes; bundle an ONNX or TensorRT engine for
those.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydantic import Field

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError, StageError
from accel.core.plan import PLAN_FILE, SamplerPlan
from accel.core.stage import StageConfig, StageContext
from export.compile_stage import compile_stage, verify_engine
from export.quality_gate import GateConfig
from export.torch_engines import (
    BucketedEngine,
    CompiledEngine,
    CudaGraphEngine,
    ShapeBuckets,
    cache_counters,
    compile_cache_dir,
)

ENGINE_DIR = "checkpoint"


class TorchCompileConfig(StageConfig):
    num_inference_steps: int | None = Field(None, ge=1)
    """Steps of the sampler plan; default: the checkpoint's own (a student's accel.json)."""
    guidance_scale: float | None = None
    """Guidance of the sampler plan; default: the checkpoint's."""
    resolution: list[int] | None = Field(None, min_length=2, max_length=2)
    """[height, width] of a pipeline's images (default: the checkpoint's own)."""
    cuda_graph: bool = True
    """Replay the compiled sampler from CUDA graphs (CUDA targets only)."""
    gate: GateConfig = GateConfig()
    """The quality gate against eager torch (``export.quality_gate.GateConfig``)."""


def compile_mode(target) -> str:
    return "max-autotune-no-cudagraphs" if target.builder.optimization_level >= 4 else "default"


def engine_precision(target) -> str:
    """fp16/bf16 on CUDA targets that ask for them; fp32 otherwise (INT8/FP8 are ONNX/TensorRT)."""
    return (
        target.precision
        if target.device == "cuda" and target.precision in ("fp16", "bf16")
        else "fp32"
    )


class TorchEngineRuntime:
    """A ``torch_compile`` engine: the checkpoint's fused sampler (``FusedSampler``; for a latent
    pipeline ``FusedPipelineSampler``: steps and VAE decode, text encoders outside) compiled, and
    on CUDA replayed from CUDA graphs, at the buckets of its batch range. ``infer`` takes the
    fused sampler's feeds and returns images; a pipeline's ``encode`` runs its text encoders
    eagerly and caches each prompt's embeddings."""

    PROMPT_CACHE = 1024  # prompts whose embeddings are kept

    def __init__(self, folder: Path, info: EngineInfo, cache: Path | None = None) -> None:
        import torch

        from distill.checkpoint import load_denoiser
        from distill.graph import DenoiserGraph
        from export.fused_sampler import FusedPipelineSampler, FusedSampler
        from export.torch_runtime import PipelineRuntime

        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"torch engine checkpoint not found: {folder}")
        if info.library_version != torch.__version__:
            raise CheckpointError(
                f"{folder.parent} was compiled with torch {info.library_version}, this is "
                f"torch {torch.__version__}; rebuild it here with the torch_compile stage"
            )
        if info.device == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"{folder.parent} is a CUDA engine, and torch sees no GPU here")
        self.plan = plan = SamplerPlan.load(folder.parent / PLAN_FILE)
        options = info.options
        lo, hi = info.batch_range or [1, 64]
        buckets = ShapeBuckets(lo, options.get("opt_batch", lo), hi, str(folder.parent))
        den, _ = load_denoiser(folder, guidance_scale=plan.guidance_scale)
        self.pipeline = None
        unbatched: list[str] = []
        if den.adapter.pixel:
            module = FusedSampler(DenoiserGraph.of(den), plan).eval()
        else:
            h, w = plan.resolution or den.adapter.default_resolution()
            self.pipeline = PipelineRuntime(DenoiserGraph.of(den), (h, w), device=info.device)
            null = self.pipeline.null_conditioning() if plan.guidance_scale != 1.0 else None
            null_t = None if null is None else {k: torch.from_numpy(v) for k, v in null.items()}
            module = FusedPipelineSampler(self.pipeline.graph, plan, null_t, decode=True).eval()
            unbatched = [k for k in plan.conditioning if not plan.is_batched(k)]
        names = module.input_names()
        shapes = {"noise": tuple(plan.sample_shape)}
        compiled = CompiledEngine(
            module, names, buckets, info.device, info.precision,
            mode=options.get("mode", "default"), cache=cache, shapes=shapes, unbatched=unbatched,
        )  # fmt: skip
        self.engine: CompiledEngine | CudaGraphEngine = compiled
        # the same module uncompiled, at the same buckets and precision: parity's reference
        self.eager = BucketedEngine(module, names, buckets, info.device, info.precision,
                                    shapes=shapes, unbatched=unbatched)  # fmt: skip
        self.eager.name = f"torch-eager:{info.device}"
        if info.device == "cuda" and options.get("cuda_graph"):
            self.engine = CudaGraphEngine(compiled, names, buckets, "cuda", info.precision, shapes,
                                          unbatched=unbatched)  # fmt: skip
        self.name = f"torch_compile:{info.device}" + (
            "+cudagraph" if isinstance(self.engine, CudaGraphEngine) else ""
        )
        self._prompts: dict[str, dict] = {}

    def encode(self, prompts: list[str]) -> dict:
        """The pipeline's text conditioning of ``prompts`` (numpy, batch first), each prompt
        encoded once and kept (up to ``PROMPT_CACHE`` prompts)."""
        if self.pipeline is None:
            raise CheckpointError("this engine's model takes class labels, not prompts")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompts))
        if missing:
            enc = self.pipeline.encode(missing)
            for i, p in enumerate(missing):
                self._prompts[p] = {
                    k: v[i : i + 1] if self.plan.is_batched(k) else v for k, v in enc.items()
                }
            while len(self._prompts) > self.PROMPT_CACHE:
                self._prompts.pop(next(iter(self._prompts)))
        rows = [self._prompts[p] for p in prompts]
        return {
            k: np.concatenate([r[k] for r in rows]) if self.plan.is_batched(k) else rows[0][k]
            for k in rows[0]
        }

    @classmethod
    def from_engine(cls, file: Path, info: EngineInfo, spin: bool = True) -> TorchEngineRuntime:
        """Inside a store (``<root>/artifacts/<key>/checkpoint``) the store's inductor cache for
        the engine's target is used."""
        file = Path(file)
        cache = None
        root = file.parent.parent.parent
        if file.parent.parent.name == "artifacts" and (root / "cache").is_dir():
            fingerprint = info.options.get("target_fingerprint")
            if fingerprint:
                cache = compile_cache_dir(root, fingerprint)
        return cls(file, info, cache)

    def inputs(self) -> dict[str, tuple[list, str]]:
        return self.engine.inputs()

    def infer(self, feeds):
        return self.engine.infer(feeds)


def warm_feeds(engine: TorchEngineRuntime, plan: SamplerPlan, batch: int) -> dict:
    """Fused-sampler feeds of ``batch`` rows (noise, labels or a prompt's embeddings, step
    noise): what a query at that batch compiles."""
    from accel.runtime.loop import fused_feeds

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((batch, *plan.sample_shape)).astype(np.float32)
    if plan.conditioning_kind == "text":
        cond = engine.encode(["a prompt to compile with"] * batch)
    elif plan.num_classes:
        cond = (np.arange(batch) % plan.num_classes).astype(np.int64)
    else:
        cond = None
    return fused_feeds(plan, noise, cond, rng)


def run(ctx: StageContext) -> None:
    config: TorchCompileConfig = ctx.config  # type: ignore[assignment]
    import torch

    from export.onnx_export import graph_and_plan
    from export.torch_runtime import PipelineRuntime, TorchRuntime

    target = ctx.target
    if target.device == "cuda" and not torch.cuda.is_available():
        raise StageError(
            "torch_compile",
            f"target {target.name!r} is a CUDA target but torch sees no GPU here; build torch "
            "engines on the machine (or GPU model) they will run on",
        )
    graph, plan = graph_and_plan(
        "torch_compile", ctx.input.path, config.num_inference_steps, config.guidance_scale,
        config.resolution,
    )  # fmt: skip
    if graph.adapter.pixel:
        eager = TorchRuntime(graph)
    else:  # the steps and the VAE decode in the graph, the text encoders outside
        eager = PipelineRuntime(graph, tuple(plan.resolution))
    fused_plan = replace(plan, fused=True, graph_output="images")
    shutil.copytree(ctx.input.path, ctx.out / ENGINE_DIR)
    fused_plan.save(ctx.out / PLAN_FILE)
    b = target.shapes.batch
    precision = engine_precision(target)
    cuda_graph = target.device == "cuda" and config.cuda_graph
    info = EngineInfo(
        backend="torch_compile",
        engine_file=ENGINE_DIR,
        library_version=torch.__version__,
        precision=precision,
        device=target.device,
        batch_range=[b.min, b.max],
        options={
            "mode": compile_mode(target),
            "cuda_graph": cuda_graph,
            "opt_batch": b.opt,
            "target_fingerprint": target.fingerprint,
        },
    )
    cache = compile_cache_dir(ctx.store.root, target.fingerprint)
    torch._dynamo.reset()  # compile from the disk cache alone, as a fresh process would
    before = cache_counters()
    t0 = time.perf_counter()
    engine = TorchEngineRuntime(ctx.out / ENGINE_DIR, info, cache)
    feeds = []
    for batch in sorted({target.scenarios.single_stream_batch, b.opt}):
        ctx.progress(f"torch_compile: compiling the fused sampler at batch {batch} ({engine.name})")
        feeds.append(warm_feeds(engine, fused_plan, batch))
        engine.infer(feeds[-1])
    compile_s = time.perf_counter() - t0
    after = cache_counters()
    # parity: the compiled sampler against itself uncompiled on the compile's feeds; the gate:
    # against the eager per-step loop (and a pipeline's eager VAE decode)
    verify_engine(
        ctx, info, (engine.eager, engine, fused_plan), config.gate, (eager, plan),
        (engine, fused_plan), feeds=feeds, compile_seconds=compile_s,
        compile_cache={k: after[k] - before[k] for k in after},
    )  # fmt: skip


STAGE = compile_stage(
    "torch_compile",
    version=1,
    config=TorchCompileConfig,
    consumes="checkpoint",
    run=run,
    description="compile the student's fused sampler with torch.compile (CUDA graphs on GPUs)",
    requires=("fused_sampler",),
)
