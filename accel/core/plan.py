"""The sampler plan: the numbers that drive a few-step loop, stored beside an engine as JSON
(``sampler_plan.json``, format ``accel.plan/6``), read by every runtime, bundle and Triton model.
A typed, versioned contract: unknown keys, missing fields and wrong types are errors on load, and
plans of the first format (``notes`` flags) are read into the typed fields."""

from __future__ import annotations

import functools
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from accel.core.errors import CheckpointError
from accel.core.model_info import check_prompt_list

PLAN_FILE = "sampler_plan.json"
PLAN_FORMAT = "accel.plan/6"
# /3 added the pipeline fields, /4 ``flow_shift``, /5 the steps' ``r_timestep`` (flow maps), /6
# the model's ``metric`` and ``evaluation_prompts``: all optional, so older plans read as /6
READ_FORMATS = ("accel.plan/2", "accel.plan/3", "accel.plan/4", "accel.plan/5", PLAN_FORMAT)
COMPONENTS = ("text_encoder", "vae_decoder")
TOKENIZER_KEYS = {"folder", "input", "max_length", "pad_id"}
TOKENIZER_OPTIONAL = {"lowercase", "prefix"}  # the prompt clean-up before tokenizing (PixArt, Sana)
SAMPLERS = ("ddim", "consistency", "flow_euler", "flow_map")
CONDITIONING_KINDS = ("text", "class", None)
MAX_SIDE, MAX_SAMPLE = 1 << 16, 1 << 28  # per-example noise: a plan asking for more is damaged


@dataclass(frozen=True)
class Step:
    """One step of the loop: x_next = a x + b x0_hat + c z, z fresh Gaussian noise (c = 0 for
    deterministic samplers), with x0_hat from the graph at ``timestep`` (integer DDPM timesteps;
    float sigma * T for flow models). A flow map's graph also takes the step's end,
    ``r_timestep``."""

    timestep: int | float
    a: float
    b: float
    c: float = 0.0
    r_timestep: float | None = None

    def __post_init__(self) -> None:
        for name in ("timestep", "a", "b", "c", "r_timestep"):
            v = getattr(self, name)
            if v is None and name == "r_timestep":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"step {name} must be a finite number, got {v!r}")


@dataclass(frozen=True)
class SamplerPlan:
    """A few-step run over an x0 graph (``distill.samplers.sampler_plan``)."""

    steps: list[Step]
    sample_shape: list[int]  # per-example noise shape: C, H, W (Flux: packed tokens, channels)
    guidance_scale: float = 1.0
    null_label: int | None = None
    num_classes: int | None = None
    init_noise_sigma: float = 1.0
    sampler: str = "ddim"  # ddim, consistency (fresh noise per step), flow_euler or flow_map
    prediction_type: str = "epsilon"  # of the backbone inside the graph (the graph outputs x0)
    graph_output: str = "x0"  # "images" for a fused sampler (the whole loop in one graph)
    guidance_input: bool = False  # a guidance-distilled graph takes w as an input: one pass
    fused: bool = False
    family: str = "unet2d"
    conditioning: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The graph's conditioning inputs besides sample and timestep: name -> {"axes", "dtype"};
    axes start with "batch" for per-example inputs (the digits models: ``class_labels``). Empty
    for unconditional graphs, and in plans of class-label graphs written before it was filled."""
    conditioning_kind: str | None = None
    """What the conditioning is made from: "text" (prompts), "class" (labels) or None."""
    timestep_dtype: str = "int64"
    """int64 DDPM timesteps, or float32 flow timesteps (sigma * T)."""
    guidance_in_model: bool = False
    """w is a conditioning input of the model (Flux-dev's guidance embedding): one pass."""
    decode: bool = False
    """The loop's result is latents that the runtime's ``decode`` turns into images (a fused
    plan's graph, images out, ends with that decode itself)."""
    resolution: list[int] | None = None  # H, W of the images
    flow_shift: dict[str, float] | None = None
    """Flow models: the shift the steps' timesteps were resolved with at ``resolution``:
    {"shift": s} (static) or {"mu": m} (dynamic: diffusers' ``set_timesteps(mu=m)``, linear in
    the image's token count); informational, the timesteps already carry it."""
    components: dict[str, str] = field(default_factory=dict)
    """A pipeline's graphs (engines) besides the denoiser's, by role (``COMPONENTS``) -> file
    beside the plan: the text encoder (token ids -> ``text_outputs``) and the VAE decoder
    (latents -> images in [-1, 1])."""
    tokenizers: list[dict[str, Any]] = field(default_factory=list)
    """The text encoder's token inputs, in order: {"folder" (holding ``tokenizer.json``),
    "input" (the graph input), "max_length" (pad and truncate to it), "pad_id"}."""
    text_outputs: list[str] = field(default_factory=list)
    """The conditioning inputs the text encoder computes; the others come from
    ``conditioning_file``."""
    conditioning_file: str | None = None
    """safetensors beside the plan: ``static.NAME`` (prompt-independent conditioning, batch 1)
    and ``null.NAME`` (classifier-free guidance's unconditional branch, batch 1)."""
    metric: str | None = None
    """The model's quality metric (its ``accel.json`` ``evaluation.metric``, a name in
    ``accel.registry.METRICS``); None: the gate's default, image RMSE."""
    evaluation_prompts: list[str] | None = None
    """The prompts a text model is calibrated and gated on (its ``accel.json``)."""
    format: str = PLAN_FORMAT

    def __post_init__(self) -> None:
        _check_types(self)
        check_prompt_list("evaluation_prompts", self.evaluation_prompts)
        steps = [s if isinstance(s, Step) else Step(**s) for s in self.steps]
        object.__setattr__(self, "steps", steps)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.conditioning_kind not in CONDITIONING_KINDS:
            raise ValueError(
                f"conditioning_kind {self.conditioning_kind!r} is not text, class or null"
            )
        if not all(isinstance(d, int) and 0 < d <= MAX_SIDE for d in self.sample_shape) or (
            math.prod(self.sample_shape) > MAX_SAMPLE
        ):
            raise ValueError(
                f"sample_shape must be positive integers (at most {MAX_SAMPLE} values per "
                f"example), got {self.sample_shape}"
            )
        for name in ("guidance_scale", "init_noise_sigma"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        for name, spec in self.conditioning.items():
            axes = spec.get("axes", ["batch"])
            if not isinstance(axes, list) or not all(isinstance(a, str | int) for a in axes):
                raise ValueError(f"conditioning {name!r}: axes must be a list, got {axes!r}")
            if not isinstance(spec.get("dtype", ""), str):
                raise ValueError(f"conditioning {name!r}: dtype must be a name, got {spec!r}")
        if (self.sampler == "flow_map") != all(s.r_timestep is not None for s in steps) and steps:
            raise ValueError("flow_map plans, and only they, give every step an r_timestep")
        if self.timestep_dtype not in ("int64", "float32"):
            raise ValueError(f"timestep_dtype must be int64 or float32, got {self.timestep_dtype}")
        if self.flow_shift is not None and (
            len(self.flow_shift) != 1
            or set(self.flow_shift) - {"shift", "mu"}
            or not all(isinstance(v, int | float) for v in self.flow_shift.values())
        ):
            raise ValueError(
                f"flow_shift must be {{'shift': s}} or {{'mu': m}}, got {self.flow_shift}"
            )
        if self.format != PLAN_FORMAT:
            raise ValueError(f"format {self.format!r} is not {PLAN_FORMAT}")
        for role, file in self.components.items():
            if role not in COMPONENTS:
                raise ValueError(f"component {role!r} is not one of {', '.join(COMPONENTS)}")
            _file_name(file, f"component {role}")
        for tok in self.tokenizers:
            if not isinstance(tok, dict) or not (
                TOKENIZER_KEYS <= set(tok) <= TOKENIZER_KEYS | TOKENIZER_OPTIONAL
            ):
                raise ValueError(
                    f"each tokenizer needs exactly {sorted(TOKENIZER_KEYS)} (optional: "
                    f"{sorted(TOKENIZER_OPTIONAL)}): {tok!r}"
                )
            _file_name(tok["folder"], "tokenizer folder")
            if not isinstance(tok["input"], str) or not all(
                type(tok[k]) is int and tok[k] >= (k == "max_length")
                for k in ("max_length", "pad_id")
            ):
                raise ValueError(
                    f"tokenizer input must be a name, max_length and pad_id integers: {tok!r}"
                )
        if self.conditioning_file is not None:
            _file_name(self.conditioning_file, "conditioning_file")
        if self.tokenizers and "text_encoder" not in self.components:
            raise ValueError("tokenizers without a text_encoder component")

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
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("it must hold a JSON object")
            if "notes" in data and "format" not in data:  # format 1: flags in a notes dict
                notes = data.pop("notes") or {}
                data.update({k: notes[k] for k in _NOTES if k in notes})
            if data.get("format") in READ_FORMATS:  # /2 plans lack only optional fields
                data["format"] = PLAN_FORMAT
            unknown = sorted(set(data) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"unknown keys {unknown}")
            if not data.get("steps"):
                raise ValueError("it has no steps")
            return cls(**data)
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{path} is not a valid sampler plan: {e}; re-export the engine"
            ) from None


def _conforms(value: Any, tp: Any) -> bool:
    """Whether a value read from JSON has the annotated type (bool is not a number)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is Step:
        return isinstance(value, Step | dict)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    return isinstance(value, tp)


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(SamplerPlan)


def _check_types(plan: SamplerPlan) -> None:
    hints = _hints()
    for f in fields(plan):
        value = getattr(plan, f.name)
        if not _conforms(value, hints[f.name]):
            raise ValueError(f"{f.name} must be {hints[f.name]}, got {value!r:.80}")


def _file_name(name: Any, what: str) -> None:
    """A file or folder name beside the plan: no paths, nothing hidden."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name[0] == ".":
        raise ValueError(f"{what} must be a file name beside the plan, got {name!r}")


_NOTES = ("sampler", "graph_output", "prediction_type", "guidance_input", "fused")


def batch_factor(plan: SamplerPlan, inputs) -> int:
    """How many graph rows one image takes: 2 when the per-step graph runs classifier-free
    guidance's doubled batch, else 1 (the batch profiles of compilers and Triton scale by it)."""
    conditioned = bool(plan.conditioning) or "class_labels" in inputs
    doubled = plan.guidance_scale != 1.0 and conditioned and not plan.guidance_in_model
    return 2 if doubled and not plan.guidance_input and not plan.fused else 1
