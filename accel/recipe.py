"""Recipes: a source checkpoint, a target and an ordered list of stages, in one TOML file.

Each stage consumes the artifact of the stage before it, or, to branch, the artifact of an earlier
stage named by ``after = "<id>"`` (that stage carries ``id = "<id>"``): an INT8 engine beside the
fp32 one, both built from one exported graph. A recipe is validated whole before the first stage
runs, and every problem is reported at once, so a typo in the last stage is found in a second
rather than after an hour of training."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from accel.core.artifact import artifact_key
from accel.core.errors import RecipeError, TargetError
from accel.core.stage import Stage, StageConfig, did_you_mean, validation_lines
from accel.core.target import Target, load_target
from accel.registry import get_stage

SOURCE_KIND = "checkpoint"
DENOISER_CONFIGS = ("unet/config.json", "transformer/config.json")
PIPELINE_FILES = ("scheduler/scheduler_config.json",)
TOP_LEVEL: dict[str, type] = {"name": str, "source": str, "target": str, "stages": list}
OPTIONAL: dict[str, type] = {"revision": str, "variant": str}
"""A Hub id's revision, and the weights variant read (``accel.core.hub.resolve_model``)."""


@dataclass
class StagePlan:
    index: int
    stage: Stage
    config: StageConfig
    parent: int | None = None
    """Position of the stage whose artifact this one consumes; None: the one before (or the
    source, for the first)."""
    id: str | None = None


@dataclass
class Recipe:
    name: str
    path: Path
    source: Path
    target: Target
    stages: list[StagePlan]


def _check_source(
    raw: str, recipe_dir: Path, problems: list[str], revision=None, variant=None
) -> Path:
    from accel.core.errors import CheckpointError
    from accel.core.hub import is_hub_id, resolve_model

    source = Path(raw).expanduser()
    source = (source if source.is_absolute() else recipe_dir / source).resolve()
    hub = is_hub_id(raw) and not source.exists()
    if hub or ((variant or revision) and source.is_dir()):
        try:
            source = resolve_model(raw if hub else source, revision, variant)
        except CheckpointError as e:
            problems.append(f"source: {e}")
            return source
    if not source.exists():
        problems.append(
            f"source: {source} does not exist; 'source' is a diffusers directory, absolute or "
            "relative to the recipe file"
        )
    elif not source.is_dir():
        problems.append(f"source: {source} is a file; 'source' must be a diffusers directory")
    elif not all((source / f).is_file() for f in PIPELINE_FILES) or not any(
        (source / f).is_file() for f in DENOISER_CONFIGS
    ):
        problems.append(
            f"source: {source} is not a diffusers pipeline directory (it needs "
            f"{' or '.join(DENOISER_CONFIGS)} and {' and '.join(PIPELINE_FILES)}, as "
            "save_pretrained writes them)"
        )
    return source


def _check_stages(entries: list[Any], problems: list[str]) -> list[StagePlan]:
    plans: list[StagePlan] = []
    previous: tuple[str, str] | None = ("the source checkpoint", SOURCE_KIND)
    ids: dict[str, tuple[int, str, str]] = {}  # id -> (position, stage name, kind produced)
    for i, entry in enumerate(entries):
        where = f"stages[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a [[stages]] table, got {entry!r}")
            previous = None
            continue
        values = dict(entry)
        name = values.pop("stage", None)
        own_id, after = values.pop("id", None), values.pop("after", None)
        if not isinstance(name, str):
            what = (
                "missing key 'stage'" if name is None else f"'stage' must be a string, got {name!r}"
            )
            problems.append(f"{where}: {what}; it names the stage to run")
            previous = None
            continue
        try:
            stage = get_stage(name)
        except RecipeError as e:
            problems.append(f"{where}: {e}")
            previous = None
            continue
        where = f"stages[{i}] ({name})"
        parent = None
        if after is not None:
            if not isinstance(after, str):
                problems.append(f"{where}: after must be the id string of an earlier stage")
                previous = None
            elif after not in ids:
                known = ", ".join(repr(k) for k in ids) or "none so far"
                problems.append(
                    f"{where}: after = {after!r} names no earlier stage; give that stage "
                    f"id = {after!r} (ids of earlier stages: {known})"
                )
                previous = None
            else:
                parent, parent_name, kind = ids[after]
                previous = (f"stage {after!r} ({parent_name})", kind)
        try:
            config = stage.config.model_validate(values)
        except ValidationError as e:
            problems.extend(f"{where}: {line}" for line in validation_lines(e, stage.config))
        else:
            plans.append(StagePlan(i, stage, config, parent, own_id))
        if previous is not None and stage.consumes != previous[1]:
            problems.append(
                f"{where} consumes {stage.consumes!r} but {previous[0]} produces "
                f"{previous[1]!r}; reorder the stages or add one that produces {stage.consumes!r}"
            )
        if own_id is not None:
            if not isinstance(own_id, str) or own_id in ids:
                problems.append(f"{where}: id {own_id!r} must be a string no other stage uses")
            else:
                ids[own_id] = (i, name, stage.produces)
        previous = (f"the previous stage ({name})", stage.produces)
    return plans


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe; every problem found goes into one RecipeError."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {path} is not valid TOML: {e}") from None

    problems: list[str] = []
    known = {**TOP_LEVEL, **OPTIONAL}
    for key in raw:
        if key not in known:
            best = did_you_mean(key, known)
            hint = f"did you mean {best!r}?" if best else f"valid keys: {', '.join(known)}"
            problems.append(f"unknown top-level key {key!r}; {hint}")
    ok = {}
    for key, kind in TOP_LEVEL.items():
        if key not in raw:
            problems.append(f"missing required top-level key {key!r}")
        elif not isinstance(raw[key], kind):
            expected = "a list of [[stages]] tables" if kind is list else "a string"
            problems.append(f"{key!r} must be {expected}, got {raw[key]!r}")
        else:
            ok[key] = raw[key]
    for key, kind in OPTIONAL.items():
        if key in raw and not isinstance(raw[key], kind):
            problems.append(f"{key!r} must be a string, got {raw[key]!r}")
    revision, variant = (raw.get(k) if isinstance(raw.get(k), str) else None for k in OPTIONAL)
    source = (
        _check_source(ok["source"], path.parent, problems, revision, variant)
        if "source" in ok
        else None
    )
    target = None
    if "target" in ok:
        try:
            target = load_target(ok["target"])
        except TargetError as e:
            problems.append(f"target: {e}")
    plans: list[StagePlan] = []
    if "stages" in ok:
        if not ok["stages"]:
            problems.append("'stages' is empty; add at least one [[stages]] table")
        plans = _check_stages(ok["stages"], problems)

    if problems:
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        raise RecipeError(
            f"recipe {path} is invalid ({count}):\n" + "\n".join(f"  {p}" for p in problems)
        )
    assert source is not None and target is not None
    plans = [replace(p, config=p.config.for_target(target)) for p in plans]
    return Recipe(name=ok["name"], path=path, source=source, target=target, stages=plans)


def stage_key(stage: Stage, config: StageConfig, parent_key: str, target: Target) -> str:
    """An artifact's key: stage name and version, config, parent and, for target-specific
    stages, the target's fingerprint."""
    fingerprint = target.fingerprint if stage.target_specific else None
    return artifact_key(
        stage.name, stage.version, config.model_dump(mode="json"), parent_key, fingerprint
    )


def parent_position(recipe: Recipe, position: int) -> int | None:
    """Position of the stage whose artifact stage ``position`` consumes (None: the source)."""
    plan = recipe.stages[position]
    if plan.parent is not None:
        return plan.parent
    return position - 1 if position else None


def plan_keys(recipe: Recipe, source_key: str) -> list[str]:
    """The artifact key of every stage in order; a stage whose key is in the store is skipped."""
    keys: list[str] = []
    for i, plan in enumerate(recipe.stages):
        parent = parent_position(recipe, i)
        parent_key = source_key if parent is None else keys[parent]
        keys.append(stage_key(plan.stage, plan.config, parent_key, recipe.target))
    return keys
