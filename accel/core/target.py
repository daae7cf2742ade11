"""Hardware targets as data: one `profiles/<name>.toml` per target.

An engine is only valid on the target it was built for, so a target's fingerprint goes into the
key and manifest of every target-specific artifact."""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    batch: MinOptMax
    resolution: MinOptMax


class BuilderOptions(_Strict):
    """Engine-builder settings (TensorRT's IBuilderConfig; trtexec's flags in brackets)."""

    optimization_level: int = Field(default=3, ge=0, le=5)  # [--builderOptimizationLevel]
    workspace_mib: int | None = Field(default=None, ge=1)  # [--memPoolSize=workspace:N]
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    """[--hardwareCompatibilityLevel]: run the engine on other GPUs of that range."""
    version_compatible: bool = False  # [--versionCompatible]: later TensorRT runtimes load it


class ProfileDefaults(_Strict):
    warmup: int = Field(default=10, ge=0)
    iterations: int = Field(default=50, ge=1)
    latency_budget_ms: float | None = Field(default=None, gt=0)


class Target(_Strict):
    name: str
    description: str
    device: Literal["cpu", "cuda"]
    gpu: str | None = None
    compute_capability: str | None = None
    backends: list[str] = Field(min_length=1)  # preference order
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = "fp32"
    shapes: Shapes
    builder: BuilderOptions = BuilderOptions()
    profile: ProfileDefaults = ProfileDefaults()

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
