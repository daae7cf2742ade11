"""The sampler plan: the numbers that drive a few-step loop, stored beside an engine as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accel.core.errors import CheckpointError

PLAN_FILE = "sampler_plan.json"


@dataclass(frozen=True)
class SamplerPlan:
    """A deterministic DDIM run over an x0 graph (``distill.samplers.ddim_coefficients``)."""

    steps: list[dict[str, float]]  # {"timestep", "a", "b"}: x_prev = a * x + b * x0_hat
    sample_shape: list[int]  # C, H, W
    guidance_scale: float = 1.0
    null_label: int | None = None
    num_classes: int | None = None
    init_noise_sigma: float = 1.0
    notes: dict[str, Any] = field(default_factory=dict)
    family: str = "unet2d"
    conditioning: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The graph's conditioning inputs besides sample and timestep: name -> {"axes", "dtype"};
    axes start with "batch" for per-example inputs. Empty in plans of class-label graphs."""
    conditioning_kind: str | None = None
    """What the conditioning is made from: "text" (prompts), "class" (labels) or None."""
    timestep_dtype: str = "int64"
    """int64 DDPM timesteps, or float32 flow timesteps (sigma * T)."""
    guidance_in_model: bool = False
    """w is a conditioning input of the model (Flux-dev's guidance embedding): one pass."""
    decode: bool = False
    """The loop's result is latents that the runtime's ``decode`` turns into images."""
    resolution: list[int] | None = None  # H, W of the images

    def is_batched(self, name: str) -> bool:
        axes = self.conditioning.get(name, {}).get("axes", ["batch"])
        return bool(axes) and axes[0] == "batch"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SamplerPlan:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"sampler plan not found: {path}")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{path} is not a valid sampler plan: {e}") from None
