"""Compile the torch student into an AOTInductor package for one target.

``torch.export.export`` traces the DenoiserGraph with a dynamic batch from the target's shape
profile; ``torch._inductor.aoti_compile_and_package`` generates and compiles C++ (CPU) or Triton
(CUDA) kernels ahead of time into a ``.pt2`` package; ``aoti_load_package`` runs it without Python
tracing or compilation at load time. The package embeds kernels built for this machine's ISA or
GPU, so the engine is target-specific. Its loader runs native code: accel opens only packages whose
hashes its manifest vouches for.

torch.export's shape guards can narrow the batch range it was asked for: diffusers' Upsample2D
branches on ``batch >= 64``, so a UNet's guards stop at 63 (../shared/FACTS.md). The stage then
builds for the range the guards allow, records it, and the runtime splits larger batches.
"""

from __future__ import annotations

import re
import shutil
import time
import warnings

from pydantic import Field

from accel.core.engine_info import EngineInfo
from accel.core.errors import StageError
from accel.core.plan import PLAN_FILE
from accel.core.stage import StageConfig, StageContext
from export.compile_stage import compile_stage, verify_engine
from export.quality_gate import GateConfig

ENGINE_FILE = "model.pt2"
# builds and loads a one-layer CUDA package in a child process: torch 2.11 on the lent H100/H200
# killed the process (SIGSEGV) in aoti_load_package for any CUDA package (../shared/FACTS.md)
CUDA_PROBE = """
import sys, tempfile, torch
m = torch.nn.Linear(8, 8).cuda().eval()
x = torch.randn(2, 8, device="cuda")
with tempfile.TemporaryDirectory() as d:
    path = torch._inductor.aoti_compile_and_package(
        torch.export.export(m, (x,)), package_path=d + "/probe.pt2"
    )
    torch._inductor.aoti_load_package(path)(x)
"""


def cuda_probe_failure(timeout: float = 300) -> str | None:
    """Why this torch cannot load CUDA AOTInductor packages here, or None: a one-layer package
    built and loaded in a child process, so that a crash is a result, not the end of accel."""
    import subprocess
    import sys

    import torch

    try:
        proc = subprocess.run(
            [sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"a one-layer CUDA package took over {timeout:.0f} s to build and load"
    if proc.returncode == 0:
        return None
    how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    last = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    return (
        f"torch {torch.__version__} cannot load a CUDA AOTInductor package on this machine (a "
        f"one-layer probe ended with {how}{': ' + last if last else ''})"
    )


class AotiConfig(StageConfig):
    num_inference_steps: int | None = Field(None, ge=1)
    """Steps of the sampler plan; default: the checkpoint's own (a student's accel.json)."""
    guidance_scale: float | None = None
    """Guidance of the sampler plan; default: the checkpoint's."""
    gate: GateConfig = GateConfig()
    """The quality gate against eager torch (``export.quality_gate.GateConfig``)."""


def export_program(graph, batch_min: int, batch_max: int):
    """torch.export of ``graph`` with a dynamic batch in [batch_min, batch_max], narrowed to the
    largest max that torch.export's guards accept; returns (program, max, input names)."""
    import torch

    from export.onnx_export import example_inputs

    device = next(graph.parameters()).device
    feeds = {k: torch.from_numpy(v).to(device) for k, v in example_inputs(graph, 2, [500]).items()}
    for attempt in range(2):
        batch = torch.export.Dim("batch", min=batch_min, max=batch_max)
        try:
            program = torch.export.export(
                graph.eval(), (), feeds, dynamic_shapes={k: {0: batch} for k in feeds}
            )
            return program, batch_max, list(feeds)
        except Exception as e:  # torch raises its UserError for violated constraints
            suggested = re.search(r"Dim\('batch', max=(\d+)\)", str(e))
            if attempt or not suggested:
                raise StageError("aoti", f"torch.export failed: {str(e).strip()[:400]}") from None
            batch_max = int(suggested.group(1))
    raise AssertionError("unreachable")


def run(ctx: StageContext) -> None:
    config: AotiConfig = ctx.config  # type: ignore[assignment]
    import torch

    from export.onnx_export import graph_and_plan
    from export.torch_runtime import AotiRuntime, TorchRuntime

    device = ctx.target.device
    if device == "cuda" and not torch.cuda.is_available():
        raise StageError(
            "aoti",
            f"target {ctx.target.name!r} is a CUDA target but torch sees no GPU here; build "
            "AOTInductor engines on the machine (or GPU model) they will run on",
        )
    if device == "cuda":
        why = cuda_probe_failure()
        if why:
            raise StageError("aoti", f"{why}; compile with --backend torch_compile instead")
    graph, plan = graph_and_plan(
        "aoti", ctx.input.path, config.num_inference_steps, config.guidance_scale
    )
    want = ctx.target.shapes.batch
    t0 = time.perf_counter()
    ctx.progress(f"aoti: torch.export, batch {want.min}..{want.max}")
    program, batch_max, names = export_program(graph.to(device), want.min, want.max)
    if batch_max < want.max:
        ctx.progress(
            f"aoti: torch.export's guards limit the batch to {batch_max} "
            f"(target {ctx.target.name!r} asks up to {want.max})"
        )
    ctx.progress(f"aoti: compiling for {device} (AOTInductor; about a minute on 2 cores)")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytree deprecation chatter from inside torch
        built = torch._inductor.aoti_compile_and_package(
            program, package_path=str(ctx.out / ENGINE_FILE)
        )
    if built != str(ctx.out / ENGINE_FILE):
        shutil.move(built, ctx.out / ENGINE_FILE)
    compile_s = time.perf_counter() - t0
    plan.save(ctx.out / PLAN_FILE)
    info = EngineInfo(
        backend="aoti",
        engine_file=ENGINE_FILE,
        library_version=torch.__version__,
        device=device,
        batch_range=[want.min, batch_max],
        options={"inputs": names},
    )
    engine = AotiRuntime(ctx.out / ENGINE_FILE, info)
    eager = TorchRuntime(graph.cpu())
    verify_engine(
        ctx, info, (eager, engine, plan), config.gate, (eager, plan), (engine, plan),
        compile_seconds=compile_s,
    )  # fmt: skip


STAGE = compile_stage(
    "aoti",
    version=1,
    config=AotiConfig,
    consumes="checkpoint",
    run=run,
    description="compile the student into an AOTInductor .pt2 package for the target",
)
