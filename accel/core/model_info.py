"""``accel.json``: what accel records beside a diffusers pipeline's ``model_index.json`` (format
``accel.model/4``; /2 added ``consistency.grid``, /3 ``evaluation``, /4 ``lora``; older files read
as /4).
A teacher's names its unconditional class and how its images are judged (the quality metric and,
for a text model, the prompts it is calibrated and gated on: ``evaluation``, which its students
inherit); a distilled student's names the method, its step count and how guidance was
distilled, so that ``accel sample``, the exporters and the next distillation stage read the
student's own defaults. A typed, versioned contract: unknown keys, wrong types and impossible
values are errors on load; files written before the format key existed (the same keys, no
``format``) are read as format 1. Stock diffusers ignores the file."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from accel.core.errors import CheckpointError

MODEL_INFO_FILE = "accel.json"
MODEL_INFO_FORMAT = "accel.model/4"
# older formats lack optional keys only
READ_FORMATS = ("accel.model/1", "accel.model/2", "accel.model/3", MODEL_INFO_FORMAT)
METHODS = ("progressive", "consistency", "scm", "meanflow", "dmd2", "add", "guidance")


def _number(name: str, v: Any, minimum: float | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {v!r}")


def _integer(name: str, v: Any, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


@dataclass(frozen=True)
class GuidanceEmbedding:
    """A guidance-distilled model's w input (Meng et al. 2023): w is snapped to the nearest of
    ``scales`` and embedded as class ``label + num_labels * index``."""

    scales: list[float]
    num_labels: int

    def __post_init__(self) -> None:
        if not isinstance(self.scales, list) or not self.scales:
            raise ValueError("guidance_embedding.scales must be a non-empty list")
        for s in self.scales:
            _number("guidance_embedding.scales[]", s)
        _integer("guidance_embedding.num_labels", self.num_labels, 1)


@dataclass(frozen=True)
class ConsistencySpec:
    """A consistency student's boundary condition (Song et al. 2023, LCM's c_skip/c_out); flow
    students record sigma_data = timestep_scaling = 0: their x0 = z - s v meets it unscaled."""

    solver_steps: int
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    grid: str = "scheduler"
    """The timesteps it samples at: its scheduler's, or "trigflow" (a continuous-time sCM
    student: ``SCMScheduler``'s TrigFlow grid mapped to flow sigmas, passed as ``sigmas``)."""

    def __post_init__(self) -> None:
        if self.grid not in ("scheduler", "trigflow"):
            raise ValueError(
                f"consistency.grid must be 'scheduler' or 'trigflow', got {self.grid!r}"
            )
        _integer("consistency.solver_steps", self.solver_steps, 1)
        _number("consistency.sigma_data", self.sigma_data, 0.0)
        _number("consistency.timestep_scaling", self.timestep_scaling, 0.0)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA student (``distill.lora``): its adapters, in diffusers' format in ``weight_name``
    beside model_index.json, apply to the denoiser the pipeline directory holds (its
    teacher's)."""

    weight_name: str
    rank: int
    alpha: float

    def __post_init__(self) -> None:
        if not isinstance(self.weight_name, str) or "/" in self.weight_name:
            raise ValueError(f"lora.weight_name must be a file name, got {self.weight_name!r}")
        _integer("lora.rank", self.rank, 1)
        _number("lora.alpha", self.alpha, 0.0)


def check_prompt_list(what: str, prompts: Any) -> None:
    """ValueError unless ``prompts`` is None or a non-empty list of non-empty prompts (``what``
    names the field)."""
    if prompts is not None and not (
        isinstance(prompts, list)
        and prompts
        and all(isinstance(p, str) and p.strip() for p in prompts)
    ):
        raise ValueError(f"{what} must be a non-empty list of non-empty prompts")


@dataclass(frozen=True)
class Evaluation:
    """How a model's images are judged: ``metric``, a name in ``accel.registry.METRICS``
    (checked where it is used: the quality gate), and the ``prompts`` a text model is calibrated
    and gated on. The quantize and compile stages use them unless their config names others."""

    metric: str | None = None
    prompts: list[str] | None = None

    def __post_init__(self) -> None:
        if self.metric is not None and not isinstance(self.metric, str):
            raise ValueError(f"evaluation.metric must be a metric name, got {self.metric!r}")
        check_prompt_list("evaluation.prompts", self.prompts)


@dataclass(frozen=True)
class ModelInfo:
    """The contents of ``accel.json``. Every field is optional: a pipeline without the file is a
    plain teacher (``ModelInfo()``)."""

    method: str | None = None  # the distillation method that made this student
    num_inference_steps: int | None = None  # a student's step count
    guidance_scale: float | None = None  # the default w to sample with (None: the family's)
    distilled_guidance_scale: float | None = None  # w baked into a student (sample with 1)
    null_class_label: int | None = None  # the unconditional class of a class-label model
    num_classes: int | None = None
    guidance_embedding: GuidanceEmbedding | None = None
    consistency: ConsistencySpec | None = None
    training: dict[str, Any] | None = None  # provenance of a shipped model (free-form)
    evaluation: Evaluation | None = None  # its quality metric and evaluation prompts
    lora: LoraSpec | None = None  # a LoRA student's adapters
    format: str = MODEL_INFO_FORMAT

    def __post_init__(self) -> None:
        if isinstance(self.guidance_embedding, dict):
            object.__setattr__(
                self, "guidance_embedding", GuidanceEmbedding(**self.guidance_embedding)
            )
        if isinstance(self.consistency, dict):
            object.__setattr__(self, "consistency", ConsistencySpec(**self.consistency))
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraSpec(**self.lora))
        if isinstance(self.evaluation, dict):
            unknown = sorted(set(self.evaluation) - {f.name for f in fields(Evaluation)})
            if unknown:
                raise ValueError(f"unknown keys {unknown} in evaluation (it takes metric, prompts)")
            object.__setattr__(self, "evaluation", Evaluation(**self.evaluation))
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.num_inference_steps is not None:
            _integer("num_inference_steps", self.num_inference_steps, 1)
        for name in ("guidance_scale", "distilled_guidance_scale"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name))
        for name in ("null_class_label", "num_classes"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), 0)
        if self.training is not None and not isinstance(self.training, dict):
            raise ValueError("training must be a JSON object")
        if self.format not in READ_FORMATS:
            raise ValueError(f"format {self.format!r} is not {MODEL_INFO_FORMAT}")
        object.__setattr__(self, "format", MODEL_INFO_FORMAT)

    def student(self, **fields: Any) -> ModelInfo:
        """A distilled student's ``accel.json``: the method's ``fields`` (method, step count,
        guidance, ...) over what a student keeps of its teacher's (this file's): its class count
        and how its images are judged."""
        return ModelInfo(
            **{"num_classes": self.num_classes, "evaluation": self.evaluation, **fields}
        )

    @property
    def is_student(self) -> bool:
        """A step-distilled student (its ODE is not the teacher's)."""
        return self.num_inference_steps is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def write(self, model_dir: str | Path) -> None:
        path = Path(model_dir) / MODEL_INFO_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def read(cls, model_dir: str | Path) -> ModelInfo:
        """The ``accel.json`` of a pipeline directory; ``ModelInfo()`` when it has none."""
        path = Path(model_dir) / MODEL_INFO_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("it must hold a JSON object")
            unknown = sorted(set(data) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"unknown keys {unknown}")
            return cls(**data)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path} is not a valid accel.json ({e}); fix it or delete it (a pipeline "
                "without one is read as a plain teacher)"
            ) from None
