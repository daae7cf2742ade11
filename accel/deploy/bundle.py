"""The bundle stage: an engine made deployable. A bundle directory holds the engine file(s), the
sampler plan (``sampler_plan.json``), a Hugging Face-style model card (``README.md``) and
``manifest.json``, whose ``info`` says everything a production runtime checks before it opens the
engine: the target (fingerprint, GPU, compute capability, CPU flags, batch range), the library
versions the engine was built with, the graph's inputs and outputs (names, shapes, dtypes), the
precision, the student's provenance and its quality and latency figures; ``files`` holds the
sha256 of every file. ``accel.runtime.Bundle`` loads it with numpy and the engine's runtime alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import Field

from accel.core.artifact import MANIFEST, Artifact, Store
from accel.core.engine_info import EngineInfo
from accel.core.errors import StageError
from accel.core.hardware import installed_version
from accel.core.plan import PLAN_FILE, SamplerPlan
from accel.core.stage import Stage, StageConfig, StageContext
from accel.runtime.backends import BACKENDS

BUNDLE_FORMAT = "accel.deploy.bundle/2"  # /1: backend names before accel.engine/2
CARD_FILE = "README.md"
ONNX_TYPES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16", 6: "int32"}


class BundleConfig(StageConfig):
    name: str = Field("accel-model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The model's name in the card and in a Triton repository."""


def _onnx_io(path: Path) -> dict[str, list[dict]]:
    """Inputs and outputs of an ONNX graph: name, dtype, shape (a str for a named axis)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(v) -> dict:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {
            "name": v.name,
            "dtype": ONNX_TYPES.get(t.elem_type, str(t.elem_type)),
            "shape": dims,
        }

    return {"inputs": [spec(v) for v in graph.input], "outputs": [spec(v) for v in graph.output]}


def _plan_io(plan: SamplerPlan, names: list[str]) -> dict[str, list[dict]]:
    """Inputs and outputs of a per-step denoiser graph that has no ONNX file (AOTInductor)."""
    dtypes = {"sample": "float32", "guidance_scale": "float32"}
    shapes = {"sample": ["batch", *plan.sample_shape]}
    return {
        "inputs": [
            {"name": n, "dtype": dtypes.get(n, "int64"), "shape": shapes.get(n, ["batch"])}
            for n in names
        ],
        "outputs": [{"name": "x0", "dtype": "float32", "shape": ["batch", *plan.sample_shape]}],
    }


def io_spec(engine: Artifact, store: Store, plan: SamplerPlan) -> dict[str, list[dict]]:
    """The engine's graph interface: from its ONNX file, or its parent's (TensorRT plans), or the
    sampler plan (AOTInductor packages)."""
    for a in store.lineage(engine):
        if (a.path / "model.onnx").is_file():
            return _onnx_io(a.path / "model.onnx")
        if a.kind == "checkpoint":
            break
    names = EngineInfo.from_dict(engine.info, str(engine.path)).options.get("inputs")
    return _plan_io(plan, names or ["sample", "timestep", "class_labels"])


def component_io(engine: Artifact, store: Store, file: str) -> dict[str, list[dict]]:
    """A pipeline component's interface, from the first ONNX file of that name in the lineage."""
    for a in store.lineage(engine):
        if (a.path / file).is_file():
            return _onnx_io(a.path / file)
    raise StageError("bundle", f"no ONNX graph {file} in the lineage of {engine.path}")


def _profile_figures(store: Store, engine: Artifact) -> dict | None:
    """SingleStream/Offline figures of this engine from a profile report in the store, if any."""
    reports = []
    for manifest in store.artifacts.glob(f"*/{MANIFEST}"):
        try:
            m = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("kind") == "report" and m.get("parent") == engine.key:
            reports.append((manifest.stat().st_mtime, manifest.parent, m))
    for _, folder, m in sorted(reports, key=lambda r: r[0], reverse=True)[:1]:  # the newest
        report = json.loads((folder / "report.json").read_text())
        out = {"target": report["target"]["name"], "report": m["key"]}
        for scenario, s in report["scenarios"].items():
            for name, r in s["results"].items():
                if name.startswith("student engine") and r.get("latency_ms"):
                    st = r["latency_ms"]
                    out[scenario] = {
                        "batch": s["batch"],
                        "p50_ms": st["p50"],
                        "p90_ms": st["p90"],
                        "images_per_s": r.get("images_per_s"),
                    }
        return out
    return None


def _card(name: str, info: dict, plan: SamplerPlan, files: list[str]) -> str:
    """A Hugging Face-style model card: YAML front matter, then what the bundle is and how to
    run it."""
    t = info["target"]
    q = info.get("quality") or {}
    lat = info.get("latency") or {}
    io = "\n".join(
        f"| {kind} | `{s['name']}` | {s['dtype']} | {s['shape']} |"
        for kind in ("inputs", "outputs")
        for s in info[kind]
    )
    lineage = " → ".join(f"{p['stage']} (`{p['key']}`)" for p in reversed(info["provenance"]))
    if q.get("candidate") and "fd_digits" in q["candidate"]:
        quality = (
            f"FD-digits {q['candidate']['fd_digits']:.3f} against {q['parent']['fd_digits']:.3f} "
            f"for its parent ({q['samples']} samples, seed {q['seeds'][0]}; gate: at most "
            f"+{q['threshold']:.0%})"
        )
    elif q.get("metric") and q.get("value") is not None:
        quality = (
            f"quality gate {q['metric']} {q['value']:.3g} against its parent (at most "
            f"{q['threshold']:g}, {q['samples']} samples)"
        )
    else:
        quality = "no quality gate figures recorded"
    where = f", {t['gpu']}, compute capability {t['compute_capability']}" if t.get("gpu") else ""
    if plan.guidance_scale == 1:
        guidance = "no classifier-free guidance"
    elif info["fused"]:
        guidance = f"guidance scale {plan.guidance_scale}, applied inside the graph"
    elif plan.guidance_input:
        guidance = f"guidance scale {plan.guidance_scale}, an input of the graph"
    else:
        guidance = (
            f"guidance scale {plan.guidance_scale}, applied by the sampler loop on a doubled batch"
        )
    latency = (
        "; ".join(
            f"{k}: batch {v['batch']}, p50 {v['p50_ms']:.2f} ms, p90 {v['p90_ms']:.2f} ms"
            for k, v in lat.items()
            if isinstance(v, dict)
        )
        or "not profiled; `accel profile BUNDLE` measures it"
    )
    return f"""---
library_name: accel
tags:
- diffusion
- distillation
- {info["backend"]}
- {info["precision"]}
pipeline_tag: unconditional-image-generation
---

# {name}

A {len(plan.steps)}-step {"fused-sampler " if info["fused"] else ""}diffusion engine built by
accel for the target `{t["name"]}` ({t["device"]}{where}), backend {info["backend"]},
precision {info["precision"]}. It samples {"x".join(map(str, plan.sample_shape))} images;
{guidance}.

## Use

```python
import numpy as np
from accel.runtime import Bundle

bundle = Bundle("path/to/{name}")  # checks hashes and the machine before opening the engine
images = bundle.sample(np.random.default_rng(0).standard_normal((4, *bundle.plan.sample_shape)),
                       labels=np.arange(4), seed=0)
```

The runtime needs numpy and {BACKENDS[info["backend"]].library} only. Built with
{", ".join(f"{k} {v}" for k, v in info["libraries"].items())}.

## Interface

| | name | dtype | shape |
|---|---|---|---|
{io}

## Quality and latency

Quality: {quality}.

Latency: {latency}.

## Provenance

{lineage}

## Files

{chr(10).join(f"- `{f}`" for f in files)} (sha256 of each in `manifest.json`)
"""


def run(ctx: StageContext) -> None:
    config: BundleConfig = ctx.config  # type: ignore[assignment]
    engine = ctx.input
    built_for = engine.target or {}
    if built_for.get("fingerprint") not in (None, ctx.target.fingerprint):
        raise StageError(
            "bundle",
            f"{engine.path} was built for target {built_for.get('name')!r}, not "
            f"{ctx.target.name!r}: pass --target {built_for.get('name')}",
        )
    described = EngineInfo.from_dict(engine.info, str(engine.path))
    backend = described.backend
    if backend not in BACKENDS:
        raise StageError("bundle", f"{engine.path} has no known engine backend ({backend!r})")
    if not (engine.path / described.engine_file).is_file():
        raise StageError(
            "bundle",
            f"{engine.path} is a {backend} engine, which runs inside accel's torch process; "
            "bundle an onnxruntime, TensorRT or AOTInductor engine instead",
        )
    for f in engine.path.iterdir():
        if f.name != MANIFEST and f.is_file():
            shutil.copy(f, ctx.out / f.name)
    plan = SamplerPlan.load(ctx.out / PLAN_FILE)
    for tok in plan.tokenizers:  # a pipeline's tokenizer folders
        shutil.copytree(engine.path / tok["folder"], ctx.out / tok["folder"])
    library = BACKENDS[backend].library
    built_with = described.library_version
    t = ctx.target
    ctx.info.update(
        format=BUNDLE_FORMAT,
        name=config.name,
        backend=backend,
        engine_file=described.engine_file,
        device=described.device,
        batch_range=described.batch_range,
        precision=described.precision,
        fused=plan.fused,
        steps=len(plan.steps),
        engine=described.to_dict(),  # what the engine's runtime class reads
        target={
            "name": t.name,
            "fingerprint": t.fingerprint,
            "device": t.device,
            "gpu": t.gpu,
            "compute_capability": described.options.get("compute_capability")
            or t.compute_capability,
            "cpu_flags": list(t.cpu_flags),
            "batch": t.shapes.batch.model_dump(),
            "version_compatible": t.builder.version_compatible,
            "hardware_compatibility": t.builder.hardware_compatibility,
        },
        libraries={
            library: built_with,
            "numpy": installed_version("numpy"),
            "accel": installed_version("accel"),
        },
        provenance=[
            {"stage": a.stage, "key": a.key, "config": a.config} for a in ctx.store.lineage(engine)
        ],
        quality=engine.metrics.get("quality_gate"),
        latency=_profile_figures(ctx.store, engine),
        **io_spec(engine, ctx.store, plan),
    )
    if plan.components:  # each component's interface, from its graph in the lineage
        ctx.info["components"] = {
            role: component_io(engine, ctx.store, file) for role, file in plan.components.items()
        }
    files = sorted(p.relative_to(ctx.out).as_posix() for p in ctx.out.rglob("*") if p.is_file()) + [
        CARD_FILE
    ]
    (ctx.out / CARD_FILE).write_text(_card(config.name, ctx.info, plan, sorted(set(files))))


STAGE = Stage(
    name="bundle",
    version=2,
    config=BundleConfig,
    consumes="engine",
    produces="bundle",
    run=run,
    target_specific=True,
    description="an engine, its sampler plan, interface, provenance and model card, for deployment",
)
