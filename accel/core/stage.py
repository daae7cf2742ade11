"""Stages: registered functions Artifact -> Artifact with a typed config.

The table of stages (``accel.registry.STAGES``) maps names to "module:attribute" strings."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from accel.core.artifact import KINDS, Artifact, Store

if TYPE_CHECKING:
    from accel.core.target import Target


class StageConfig(BaseModel):
    """Base of every stage config: a typo in a recipe is an error, and a config is a value."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    def for_target(self, target: Target) -> StageConfig:
        """The config with any value that defers to the target resolved (a training stage's
        ``mixed_precision = "target"``); artifact keys are computed from it."""
        return self


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class StageContext:
    """What a stage's `run` gets: it writes files into `out` and figures into `metrics`."""

    input: Artifact
    config: BaseModel
    target: Target
    out: Path
    metrics: dict
    info: dict
    store: Store
    progress: Callable[[str], None] = say
    work: Path | None = None
    """A directory that outlives a failed run (training checkpoints); removed after success."""
    resume: bool = False
    """Continue from the checkpoints in ``work`` instead of starting over."""


@dataclass(frozen=True)
class Stage:
    """A named, versioned step. Bump `version` when its output changes for the same config, so
    cached artifacts from the old code are not reused."""

    name: str
    version: int
    config: type[BaseModel]
    consumes: str
    produces: str
    run: Callable[..., None] | str
    """The stage's function of a ``StageContext``, or its "module:function" (imported on the
    first call: the declarations of the torch stages stay importable without torch)."""
    target_specific: bool = False
    description: str = ""
    data_parallel: bool = False
    """Under ``accelerate launch`` every process runs it (a training stage, on its own batches) and
    process 0 writes the artifact; other stages run on process 0 while the rest wait."""
    requires: tuple[str, ...] = ("pixel",)
    """What a checkpoint it consumes must be able to do (``distill.models.CAPABILITIES``: the
    adapter's ``capabilities_of``); the default, the pixel-space models only."""

    def __post_init__(self) -> None:
        if isinstance(self.run, str):
            object.__setattr__(self, "run", _Imported(self.run))
        for role in ("consumes", "produces"):
            if getattr(self, role) not in KINDS:
                kind = getattr(self, role)
                raise ValueError(f"stage {self.name!r} {role} {kind!r}; use one of {KINDS}")
        if not (isinstance(self.config, type) and issubclass(self.config, BaseModel)):
            raise TypeError(f"stage {self.name!r}: config must be a pydantic model class")


class _Imported:
    """A "module:function" imported when first called."""

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def __call__(self, *args, **kwargs):
        import importlib

        module, _, name = self.ref.partition(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    def __repr__(self) -> str:
        return self.ref


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The closest choice, if any is close enough to be a likely typo."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `Shapes`, `Shapes | None`, `list[Shapes]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := _submodel(arg)) is not None:
            return found
    return None


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        if isinstance(part, int):  # a list index: the element type was already unwrapped
            continue
        info = model.model_fields.get(part)
        sub = _submodel(info.annotation) if info is not None else None
        if sub is None:
            return None
        model = sub
    return model


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def validation_lines(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One readable line per pydantic error, with the field path and, for an unknown key, the
    closest valid key (pydantic alone says only 'Extra inputs are not permitted')."""
    lines = []
    for err in exc.errors():
        loc, path = tuple(err["loc"]), _dotted(tuple(err["loc"]))
        if err["type"] == "extra_forbidden" and loc:
            owner = _model_at(model, loc[:-1])
            fields = list(owner.model_fields) if owner is not None else []
            prefix = _dotted(loc[:-1]) + "." if len(loc) > 1 else ""
            best = did_you_mean(str(loc[-1]), fields)
            if best:
                lines.append(f"unknown key '{path}'; did you mean '{prefix}{best}'?")
            else:
                lines.append(f"unknown key '{path}'; valid keys: {', '.join(fields) or 'none'}")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{path}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            where = f"key '{path}'" if path else "config"
            lines.append(f"{where}: {msg} (got {err['input']!r})")
    return lines
