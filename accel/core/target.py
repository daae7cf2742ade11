"""Hardware targets as data: one `profiles/<name>.toml` per target.

An engine is only valid on the target it was built for, so a target's fingerprint goes into the
key and manifest of every target-specific artifact."""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from accel.core.artifact import canonical_json
from accel.core.errors import TargetError
from accel.core.stage import did_you_mean, validation_lines

PROFILES_DIR = Path(__file__).resolve().parents[2] / "profiles"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MinOptMax(_Strict):
    """A dynamic dimension: engines accept [min, max] and are tuned for opt."""

    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> MinOptMax:
        if not self.min <= self.opt <= self.max:
            raise ValueError(
                f"need min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}"
            )
        return self


class Shapes(_Strict):
    """Batch and resolution ranges (the sample's H = W as the denoiser sees it: latents for latent
    diffusion). Written as tables, or as trtexec's flags: ``trtexec = "--minShapes=sample:1x4x64x64
    --optShapes=sample:4x4x64x64 --maxShapes=sample:8x4x64x64"``."""

    batch: MinOptMax
    resolution: MinOptMax

    @model_validator(mode="before")
    @classmethod
    def _from_trtexec(cls, data):
        if isinstance(data, dict) and "trtexec" in data:
            rest = {k: v for k, v in data.items() if k != "trtexec"}
            if rest:
                raise ValueError(
                    f"give shapes as trtexec flags or as tables, not both ({list(rest)})"
                )
            return parse_trtexec_shapes(data["trtexec"])
        return data

    def trtexec(self, input_name: str = "sample", channels: int = 4) -> str:
        """The same ranges as trtexec's --minShapes/--optShapes/--maxShapes for an image input."""
        flags = {"min": "--minShapes", "opt": "--optShapes", "max": "--maxShapes"}
        return " ".join(
            f"{flag}={input_name}:{getattr(self.batch, k)}x{channels}x"
            f"{getattr(self.resolution, k)}x{getattr(self.resolution, k)}"
            for k, flag in flags.items()
        )


def parse_trtexec_shapes(text: object) -> dict:
    """``--minShapes=NAME:BxCxHxW --optShapes=... --maxShapes=...`` -> {batch, resolution} tables."""
    if not isinstance(text, str):
        raise ValueError("shapes.trtexec must be a string of trtexec's shape flags")
    found = dict(re.findall(r"--(min|opt|max)Shapes=\S+?:(\d+(?:x\d+)*)", text))
    if set(found) != {"min", "opt", "max"}:
        raise ValueError(
            "shapes.trtexec needs --minShapes, --optShapes and --maxShapes, each NAME:BxCxHxW, "
            f"got {text!r}"
        )
    out: dict[str, dict[str, int]] = {"batch": {}, "resolution": {}}
    for k, dims in found.items():
        d = [int(x) for x in dims.split("x")]
        if len(d) != 4 or d[2] != d[3]:
            raise ValueError(
                f"shapes.trtexec: --{k}Shapes must be an image input BxCxHxW with H = W, got {dims}"
            )
        out["batch"][k], out["resolution"][k] = d[0], d[2]
    return out


class BuilderOptions(_Strict):
    """Engine-builder settings (TensorRT's IBuilderConfig; trtexec's flags in brackets)."""

    optimization_level: int = Field(default=3, ge=0, le=5)  # [--builderOptimizationLevel]
    workspace_mib: int | None = Field(default=None, ge=1)  # [--memPoolSize=workspace:N]
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    """[--hardwareCompatibilityLevel]: run the engine on other GPUs of that range."""
    version_compatible: bool = False  # [--versionCompatible]: later TensorRT runtimes load it


class HarnessDefaults(_Strict):
    """How latency is measured (trtexec's defaults: --warmUp=200 --duration=3 --iterations=10).

    Warm-up runs until both ``warmup_iterations`` calls and ``warmup_ms`` have passed; timing then
    runs ``iterations`` calls when set, else until ``duration_ms`` has passed and at least
    ``min_iterations`` calls were timed."""

    warmup_iterations: int = Field(default=1, ge=0)
    warmup_ms: float = Field(default=200.0, ge=0)
    iterations: int | None = Field(default=None, ge=1)
    duration_ms: float = Field(default=3000.0, ge=0)
    min_iterations: int = Field(default=10, ge=1)


class ScenarioDefaults(_Strict):
    """MLPerf LoadGen's scenarios: SingleStream (one query of ``single_stream_batch`` images at a
    time, p90), Offline (throughput at the profile's largest batch), Server (Poisson arrivals at
    ``server_rate_qps`` for ``server_duration_s``, p99 against ``server_latency_bound_ms``)."""

    default: Literal["single_stream", "offline", "server"] = "single_stream"
    single_stream_batch: int = Field(default=1, ge=1)
    server_rate_qps: float = Field(default=1.0, gt=0)
    server_duration_s: float = Field(default=10.0, gt=0)
    server_latency_bound_ms: float | None = Field(default=None, gt=0)
    """Default: the target's latency budget."""


class Target(_Strict):
    name: str
    description: str
    device: Literal["cpu", "cuda"]
    cpu_flags: list[str] = []
    """Instruction-set features the target needs (/proc/cpuinfo names); `accel targets detect`
    matches them."""
    gpu: str | None = None
    """The GPU's name as NVML reports it, or a part of it ("H100 80GB HBM3")."""
    compute_capability: str | None = Field(default=None, pattern=r"^\d+\.\d+$")
    memory_gib: float | None = Field(default=None, gt=0)
    """Device memory (GPU, or unified memory on Jetson); host memory for CPU targets."""
    backends: list[str] = Field(min_length=1)
    """The engine backends it runs, in preference order: names of ``accel.registry.BACKENDS``
    (``ort``, ``tensorrt``, ``aoti``, ``torch_compile``), the names of ``accel compile
    --backend``."""
    providers: list[
        Literal["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    ] = []
    """onnxruntime's execution providers for the ``ort`` backend, in preference order (default:
    CPU on cpu targets, CUDA on cuda targets)."""
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = "fp32"
    shapes: Shapes
    builder: BuilderOptions = BuilderOptions()
    harness: HarnessDefaults = HarnessDefaults()
    scenarios: ScenarioDefaults = ScenarioDefaults()
    latency_budget_ms: float | None = Field(default=None, gt=0)
    """The end-to-end latency one query may take; checked against SingleStream's p90."""

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, backends: list[str]) -> list[str]:
        from accel.registry import BACKENDS, backend_name

        for name in backends:
            if name in BACKENDS:
                continue
            now = backend_name(name)
            if name.startswith("onnxruntime-"):
                ep = {"cuda": "CUDA", "tensorrt": "Tensorrt"}.get(name.split("-", 1)[1], "")
                raise ValueError(
                    f"backend {name!r} is now 'ort' with providers = [\"{ep}ExecutionProvider\"]"
                )
            if now:
                raise ValueError(f"backend {name!r} is now {now!r}")
            raise ValueError(f"unknown backend {name!r}; the backends are {', '.join(BACKENDS)}")
        return backends

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider the ``ort`` backend uses on this target."""
        if self.providers:
            return self.providers[0]
        return "CUDAExecutionProvider" if self.device == "cuda" else "CPUExecutionProvider"

    @model_validator(mode="after")
    def _gpu_fields(self) -> Target:
        if self.device == "cuda" and not (self.gpu and self.compute_capability):
            raise ValueError(
                "a cuda target needs gpu (its NVML name) and compute_capability (e.g. '9.0')"
            )
        b = self.shapes.batch
        if not b.min <= self.scenarios.single_stream_batch <= b.max:
            raise ValueError(
                f"scenarios.single_stream_batch {self.scenarios.single_stream_batch} is outside "
                f"shapes.batch {b.min}..{b.max}"
            )
        return self

    @property
    def draw_batch(self) -> int:
        """The batch every "draw N images" path (quality gates, calibration, the profile's
        quality, ``accel sample``) samples in: the largest the target serves, so that memory
        follows the target, never the sample count."""
        return self.shapes.batch.max

    @property
    def server_latency_bound_ms(self) -> float | None:
        return self.scenarios.server_latency_bound_ms or self.latency_budget_ms

    @property
    def fingerprint(self) -> str:
        """Changes with any field but the description: an engine built for one target is never
        reused on another."""
        dump = canonical_json(self.model_dump(mode="json", exclude={"description"}))
        return hashlib.sha256(dump.encode()).hexdigest()[:16]


def profiles_dir() -> Path:
    """`ACCEL_PROFILES` overrides the repo's profiles/ (read at call time, so tests can set it)."""
    return Path(os.environ.get("ACCEL_PROFILES") or PROFILES_DIR)


def list_targets() -> list[str]:
    directory = profiles_dir()
    return sorted(p.stem for p in directory.glob("*.toml")) if directory.is_dir() else []


def load_target(name_or_path: str | Path) -> Target:
    """Load a target by profile name (`cpu`) or by path to a .toml file."""
    text = str(name_or_path)
    if text.endswith(".toml") or os.sep in text or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise TargetError(f"target file not found: {path}")
    else:
        path = profiles_dir() / f"{text}.toml"
        if not path.is_file():
            known = list_targets()
            best = did_you_mean(text, known)
            hint = f"did you mean {best!r}? " if best else ""
            raise TargetError(
                f"unknown target {text!r}; {hint}known targets: {', '.join(known) or 'none'} "
                f"(in {profiles_dir()}); or give the path to a target .toml file"
            )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TargetError(f"target file {path} is not valid TOML: {e}") from None
    try:
        return Target.model_validate(data)
    except ValidationError as e:
        lines = "\n".join(f"  {line}" for line in validation_lines(e, Target))
        raise TargetError(f"target file {path} is invalid:\n{lines}") from None
