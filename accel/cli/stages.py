"""The single-stage commands (`accel distill ...`, `accel export ...`, `accel lora`,
`accel quantize`, `accel compile`, `accel bundle`), their options typed from the stage configs' fields."""

from __future__ import annotations

import tomllib
from pathlib import Path

import click

from accel.cli import (
    _copy_out,
    cli,
    resume_option,
    source_options,
    store_option,
)
from accel.core.errors import RecipeError
from accel.core.hub import resolve_model
from accel.registry import BACKENDS


def _parse_value(raw: str):
    """A TOML literal if it parses as one ('4', '1e-4', 'true', '[0, 1]'), else the string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _toml_literal(value) -> str:
    """A default as the TOML a recipe (or this option) would take: '{ metric = "fd_digits" }'."""
    import json

    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_literal(v)}" for k, v in value.items()) + " }"
    if value is None:
        return "none"
    return json.dumps(value)


def _config_option(field: str, info) -> click.Option:
    """The option of a stage config's field: its click type from the annotation and the
    field's bounds (``INTEGER RANGE``, ``FLOAT RANGE``, a ``Choice`` of a Literal's values, a
    --x/--no-x flag for a bool; a TOML literal for lists and tables), its help the field's own
    description and default. Optional fields (``int | None``) take the type of their value."""
    import types
    import typing

    import annotated_types

    kinds = [a for a in typing.get_args(info.annotation) if a is not type(None)]
    union = typing.get_origin(info.annotation) in (typing.Union, types.UnionType)
    kind = kinds[0] if union and len(kinds) == 1 else info.annotation
    bounds: dict = {}
    for m in info.metadata:
        for name, key, is_open in (("ge", "min", False), ("gt", "min", True),
                                   ("le", "max", False), ("lt", "max", True)):  # fmt: skip
            if isinstance(m, getattr(annotated_types, name.title())):
                bounds[key] = getattr(m, name)
                bounds[f"{key}_open"] = is_open
    flag = field.replace("_", "-")
    text = " ".join((info.description or "").replace("``", "").split())
    default = "required" if info.is_required() else f"default: {_toml_literal(info.default)}"
    shown = f"{text} ({default})".strip()
    decls = [f"--{flag}", field]
    if kind is bool:
        return click.Option([f"--{flag}/--no-{flag}", field], default=None, help=shown)
    if kind is int:
        kind_type: click.ParamType = click.IntRange(**bounds) if bounds else click.INT
    elif kind is float:
        kind_type = click.FloatRange(**bounds) if bounds else click.FLOAT
    elif typing.get_origin(kind) is typing.Literal:
        kind_type = click.Choice([str(v) for v in typing.get_args(kind)])
    else:
        return click.Option(decls, metavar="TOML", help=shown)
    return click.Option(decls, type=kind_type, help=shown)


class StageCommand(click.Command):
    """A command for a stage with one option per field of its config (the recipe's key names,
    dashes for underscores; booleans as --x/--no-x flags). ``stages`` is one stage name, or a
    choice of stages: by the option ``choice`` names (``--backend``, ``--method``), else by the
    kind of artifact INPUT is. Config classes are imported on first use, not at `accel --help`."""

    def __init__(
        self,
        name: str,
        stages: str | dict[str, str],
        help: str,
        choice: tuple[str, str] | None = None,
    ) -> None:
        params: list[click.Parameter] = [
            click.Argument(["input_dir"], metavar="INPUT", type=click.Path(path_type=Path)),
            click.Option(
                ["--out"],
                type=click.Path(file_okay=False, path_type=Path),
                help="Copy the resulting artifact directory here.",
            ),
            click.Option(
                ["--target", "target_name"],
                default="cpu",
                show_default=True,
                help="Hardware target (profiles/ name or a .toml path).",
            ),
            *store_option(lambda: None).__click_params__,
            *resume_option(lambda: None).__click_params__,
            *source_options(lambda: None).__click_params__,
        ]
        self.stages = {"": stages} if isinstance(stages, str) else dict(stages)
        self.choice = choice  # (option name, help): the option picks the stage
        if choice:
            params.append(
                click.Option(
                    [f"--{choice[0]}", "choice"],
                    type=click.Choice(list(self.stages)),
                    default=next(iter(self.stages)),
                    show_default=True,
                    help=choice[1],
                )
            )
        super().__init__(name, callback=self.invoke_stage, help=help, params=params)
        self._config_options = False
        self._toml_fields: set[str] = set()  # options given as TOML literals (lists, tables)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._config_options:
            from accel.registry import get_stage

            self._config_options = True
            seen: set[str] = set()
            for stage_name in self.stages.values():
                for field, info in get_stage(stage_name).config.model_fields.items():
                    if field in seen:
                        continue
                    seen.add(field)
                    option = _config_option(field, info)
                    if option.type is click.STRING:
                        self._toml_fields.add(field)
                    self.params.append(option)
        return super().get_params(ctx)

    def invoke_stage(
        self,
        input_dir: Path,
        out: Path | None,
        target_name: str,
        store: Path | None,
        resume: bool,
        revision: str | None = None,
        variant: str | None = None,
        choice: str | None = None,
        **options,
    ) -> None:
        from pydantic import ValidationError

        from accel.core.artifact import MANIFEST, Artifact
        from accel.core.errors import CheckpointError
        from accel.core.stage import validation_lines
        from accel.core.target import load_target
        from accel.pipeline import default_store, run_or_reuse
        from accel.processes import Processes
        from accel.registry import get_stage

        s = default_store(store)
        input_dir = resolve_model(input_dir, revision, variant)
        if (input_dir / MANIFEST).is_file():
            parent = Artifact.load(input_dir)
            parent.verify()
            if s.has(parent.key) and s.get(parent.key).files != parent.files:
                raise CheckpointError(  # the store's results of that key are not of these files
                    f"{input_dir} claims key {parent.key}, and the store at {s.root} holds "
                    "another artifact under that key (its files differ: edited after it was "
                    "built?); rebuild it from its source, or use another --store"
                )
        else:
            parent = s.source(input_dir)
        if self.choice:
            stage = get_stage(self.stages[choice or next(iter(self.stages))])
        elif len(self.stages) == 1:
            stage = get_stage(next(iter(self.stages.values())))
        elif parent.kind in self.stages:
            stage = get_stage(self.stages[parent.kind])
        else:
            raise RecipeError(
                f"{self.name} takes a {' or '.join(self.stages)}, but {input_dir} is a {parent.kind}"
            )
        given = {k: v for k, v in options.items() if v is not None}
        foreign = sorted(set(given) - set(stage.config.model_fields))
        if foreign:
            flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
            raise RecipeError(f"{self.name}: {flags} do not apply to stage {stage.name!r}")
        try:
            config = stage.config(
                **{k: _parse_value(v) if k in self._toml_fields else v for k, v in given.items()}
            )
        except ValidationError as e:
            lines = validation_lines(e, stage.config)
            for field in stage.config.model_fields:  # recipe key names -> option names
                lines = [ln.replace(f"'{field}'", f"'--{field.replace('_', '-')}'") for ln in lines]
            raise RecipeError(f"{self.name}: " + "; ".join(lines)) from None
        if parent.kind != stage.consumes:
            raise RecipeError(
                f"{self.name} ({stage.name}) takes a {stage.consumes}, but {input_dir} is a "
                f"{parent.kind}"
            )
        artifact = run_or_reuse(stage, config, parent, load_target(target_name), s, resume=resume)
        if out is not None and Processes().is_main:
            _copy_out(artifact.path, out)
        click.echo(out or artifact.path)


@cli.group()
def distill() -> None:
    """Distillation stages: train a few-step student from a teacher."""


@cli.group()
def export() -> None:
    """Export stages: turn a student into a graph."""


distill.add_command(
    StageCommand(
        "progressive",
        "progressive",
        "Progressive distillation (Salimans & Ho 2022) of the teacher at INPUT.",
    )
)
distill.add_command(
    StageCommand(
        "consistency",
        "consistency",
        "Consistency distillation (Song et al. 2023; LCM) of the teacher at INPUT.",
    )
)
distill.add_command(
    StageCommand(
        "scm",
        "scm",
        "Continuous-time consistency distillation (sCM, Lu & Song 2024) of the flow teacher at "
        "INPUT.",
    )
)
distill.add_command(
    StageCommand(
        "meanflow",
        "meanflow",
        "Flow-map distillation by MeanFlow (Geng et al. 2025) of the flow teacher at INPUT: one "
        "student for any step count.",
    )
)
distill.add_command(
    StageCommand(
        "adversarial",
        {"dmd2": "adversarial", "add": "add"},
        "Adversarial distillation of the teacher at INPUT, or a fine-tune of a student it "
        "distilled: DMD2 (Yin et al. 2024) or ADD (Sauer et al. 2023).",
        choice=("method", "dmd2: distribution matching + GAN; add: adversarial + distillation."),
    )
)
distill.add_command(
    StageCommand(
        "guidance",
        "guidance",
        "Guidance distillation (Meng et al. 2023) of the teacher at INPUT: w becomes an input.",
    )
)
export.add_command(
    StageCommand(
        "onnx", "onnx", "Export the student at INPUT to ONNX (dynamo), with a parity check."
    )
)
export.add_command(
    StageCommand(
        "fp16",
        "fp16",
        "Convert the ONNX graph at INPUT to fp16 for GPU targets (IO, norms, sampler math fp32).",
    )
)
export.add_command(
    StageCommand(
        "optimize",
        "optimize",
        "Clean up the ONNX graph at INPUT with onnxslim, with a parity check against it.",
    )
)
cli.add_command(
    StageCommand(
        "lora",
        "lora",
        "Fuse a LoRA (--file, diffusers or kohya keys, through diffusers' load_lora_weights) into "
        "the weights of the pipeline at INPUT: a teacher before distillation, or a student before "
        "export.",
    )
)
cli.add_command(
    StageCommand(
        "quantize",
        {"onnx": "quantize", "checkpoint": "quantize_torch"},
        "Quantize INPUT to INT8/FP8, calibrated on its own sampling trajectory: an ONNX artifact "
        "with onnxruntime or Model Optimizer's ONNX PTQ, a student checkpoint with Model "
        "Optimizer's mtq.quantize.",
    )
)
cli.add_command(
    StageCommand(
        "compile",
        {name: row.stage for name, row in BACKENDS.items()},
        "Compile INPUT into an engine for --target: an ONNX artifact with onnxruntime (ort) or "
        "TensorRT (tensorrt, GPU targets), a student checkpoint with AOTInductor (aoti) or "
        "torch.compile of its fused sampler, replayed from CUDA graphs on GPUs (torch_compile).",
        choice=("backend", "Which compiler builds the engine."),
    )
)
cli.add_command(
    StageCommand(
        "bundle",
        "bundle",
        "Bundle the engine at INPUT for deployment: engine, sampler plan, manifest (target, "
        "library versions, interface, sha256 of every file, provenance, quality, latency) and a "
        "model card. accel.runtime.Bundle runs it without torch.",
    )
)
