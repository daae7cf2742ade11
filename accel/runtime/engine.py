"""Opening an engine artifact (its backend's runtime, from the backend table) or a bundle. A
diffusers directory is torch's to open (``export.torch_runtime.open_model``); the CLI chooses
between them (``artifact_kind``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError
from accel.core.plan import SamplerPlan
from accel.runtime.backends import open_backend
from accel.runtime.bundle import Bundle
from accel.runtime.loop import Runtime


def open_engine(
    path: str | Path, target: Any = None, spin: bool = True
) -> tuple[Runtime, SamplerPlan]:
    """An engine artifact's runtime and sampler plan, after checking its file hashes and, when a
    target is given, that the engine was built for it."""
    from accel.core.artifact import Artifact
    from accel.core.errors import TargetMismatch
    from accel.core.plan import PLAN_FILE

    engine = Artifact.load(path)
    if engine.kind != "engine":
        raise CheckpointError(f"{path} is a {engine.kind} artifact, not an engine")
    engine.verify()
    if target is not None and engine.target and engine.target["fingerprint"] != target.fingerprint:
        raise TargetMismatch(
            f"{path} was built for target {engine.target['name']!r} ({engine.target['fingerprint']}), "
            f"not {target.name!r} ({target.fingerprint}); rebuild it with "
            f"`accel compile ONNX_ARTIFACT --target {target.name}`"
        )
    info = EngineInfo.from_dict(engine.info, str(path))
    plan = SamplerPlan.load(Path(path) / PLAN_FILE)
    return open_engines(Path(path), info, plan, spin), plan


def open_engines(root: Path, info: EngineInfo, plan: SamplerPlan, spin: bool = True) -> Runtime:
    """The denoiser engine of ``info`` in ``root`` and, for a pipeline, its other engines (the
    same backend and options, their files named by the plan)."""
    from dataclasses import replace

    from accel.runtime.pipeline import open_pipeline

    denoiser = open_backend(root / info.engine_file, info, spin)
    return open_pipeline(
        root,
        plan,
        denoiser,
        lambda file: open_backend(root / file, replace(info, engine_file=file), spin),
    )


def artifact_kind(path: str | Path) -> str | None:
    """The artifact kind of ``path`` ("bundle", "engine", ...), None for a plain directory."""
    from accel.core.artifact import MANIFEST, Artifact

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model or engine not found: {path}")
    return Artifact.load(path).kind if (path / MANIFEST).is_file() else None


def open_runtime(
    path: str | Path,
    target: Any = None,
    steps: int | None = None,
    guidance: float | None = None,
    spin: bool = True,
    resolution: tuple[int, int] | None = None,
) -> tuple[Runtime, SamplerPlan]:
    """A bundle or an engine artifact (its own runtime) with its plan. An engine's step count and
    guidance are fixed at export time: asking for others is an error."""
    kind = artifact_kind(path)
    runtime: Runtime
    if kind == "bundle":
        bundle = Bundle(path, target)
        runtime, plan = bundle, bundle.plan
    elif kind == "engine":
        runtime, plan = open_engine(path, target, spin=spin)
    else:
        raise CheckpointError(f"{path} is not an engine or a bundle")
    if resolution is not None:
        raise CheckpointError(f"{path} is an engine for one resolution; drop --height/--width")
    if steps is not None and steps != len(plan.steps):
        raise CheckpointError(
            f"{path} is an engine for {len(plan.steps)} steps; its sampler plan "
            "is fixed at export time (drop --steps)"
        )
    if guidance is not None and guidance != plan.guidance_scale:
        raise CheckpointError(
            f"{path} samples with guidance {plan.guidance_scale}, fixed at export "
            "time (drop --guidance)"
        )
    return runtime, plan
