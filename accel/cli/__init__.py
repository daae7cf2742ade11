"""The `accel` command line. Heavy libraries (torch, diffusers, onnx) are imported inside commands,
so `accel --help` stays instant. User errors (AccelError) print one message and exit non-zero."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

import click

from accel.core.errors import AccelError, RecipeError

RECIPES = Path(__file__).parents[1] / "recipes"
DEMO_RECIPES = ("text-digits", "digits-pixel")  # the first is `accel demo`'s default
store_option = click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Artifact store (default: $ACCEL_STORE or ./.accel-store).",
)


def size_options(f):
    """--height and --width of the images latent models draw (default: the model's own)."""
    for side in ("width", "height"):
        f = click.option(f"--{side}", type=click.IntRange(min=1), default=None,
                         help=f"Image {side} for latent models (default: the model's own).")(f)  # fmt: skip
    return f


def open_runtime(
    path: Path,
    target=None,
    steps: int | None = None,
    guidance: float | None = None,
    spin: bool = True,
    resolution: tuple[int, int] | None = None,
):
    """A bundle or an engine artifact (its own runtime, no torch), or a diffusers directory (torch
    eager), with its sampler plan."""
    from accel.runtime import artifact_kind
    from accel.runtime import open_runtime as open_artifact

    if artifact_kind(path) in ("bundle", "engine"):
        return open_artifact(path, target, steps, guidance, spin, resolution)
    from export.torch_runtime import open_model

    device = "cuda" if target is not None and target.device == "cuda" else "cpu"
    return open_model(path, steps, guidance, device, resolution)


def _resolution(height: int | None, width: int | None) -> tuple[int, int] | None:
    if (height is None) != (width is None):
        raise click.BadParameter("give both --height and --width, or neither")
    return (height, width) if height and width else None


resume_option = click.option(
    "--resume",
    is_flag=True,
    help="Continue training stages from the checkpoints of an interrupted run.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="accel")
def cli() -> None:
    """accel: distill a diffusion checkpoint, compile it into an engine, and profile it."""


def main() -> None:
    try:
        code = _run()
    finally:
        _end_processes()
    if isinstance(code, int) and code:
        sys.exit(code)


def _end_processes() -> None:
    """Leave a multi-process run's process group before exiting, as torch.distributed asks: a
    gloo group left to interpreter shutdown can abort the process ("terminate called without an
    active exception") after every stage succeeded. Imports nothing a plain run did not."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _run():
    try:
        return cli.main(standalone_mode=False)  # ctx.exit()'s code, if a command set one
    except click.exceptions.Abort:  # click's form of Ctrl-C
        click.echo("interrupted; the store keeps only completed stages", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except AccelError as e:
        click.echo(f"error: {_shorten(str(e))}", err=True)
        sys.exit(e.exit_code)
    except MemoryError:  # a size in the input (batch, samples, resolution) beyond this machine
        click.echo(
            "error: out of memory: a size asked for (images, batch, samples, resolution) needs "
            "more memory than this machine has; ask for less",
            err=True,
        )
        sys.exit(1)


def _shorten(message: str, limit: int = 4000) -> str:
    """An error message of sane length: one that quotes a huge input value keeps its ends."""
    if len(message) <= limit:
        return message
    cut = len(message) - limit
    return f"{message[: limit // 2]} [... {cut} characters ...] {message[-limit // 2 :]}"


# ---------------------------------------------------------------- recipes


def _publish(dst: Path, fill) -> None:
    """Build an output directory in a temp sibling with ``fill(tmp)``, then swap it in with one
    rename: a failure leaves ``dst`` as it was, never half-written or mixing two runs."""
    dst = dst.resolve()
    if dst.exists() and not dst.is_dir():
        raise click.BadParameter(f"{dst} exists and is not a directory", param_hint="--out")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would become the output's mode
    try:
        fill(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_out(src: Path, dst: Path) -> None:
    _publish(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@store_option
@resume_option
def run(recipe: Path, store: Path | None, resume: bool) -> None:
    """Run RECIPE (TOML): every stage not already in the store."""
    from accel.pipeline import default_store, run_recipe
    from accel.recipe import load_recipe

    artifacts = run_recipe(load_recipe(recipe), default_store(store), resume=resume)
    click.echo(artifacts[-1].path)


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@store_option
def plan(recipe: Path, store: Path | None) -> None:
    """Show which stages of RECIPE are cached (HIT) and which would run (MISS)."""
    from accel.pipeline import default_store
    from accel.pipeline import plan as make_plan
    from accel.recipe import load_recipe

    r = load_recipe(recipe)
    source, stages = make_plan(r, default_store(store))
    click.echo(
        f"recipe {r.name}, target {r.target.name} ({r.target.fingerprint}), source {source.key}"
    )
    for i, s in enumerate(stages, 1):
        branch = f"  (from [{s.plan.parent + 1}])" if s.plan.parent is not None else ""
        click.echo(
            f"  [{i}] {s.plan.stage.name:<12} {'HIT ' if s.hit else 'MISS'}  {s.key}{branch}"
        )


def demo_recipe(name: str) -> Path:
    """The shipped recipe ``name`` (``accel/recipes/<name>.toml``)."""
    return RECIPES / f"{name}.toml"


@cli.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Where student/, engine/, bundle/ and the report go.",
)
@click.option(
    "--recipe",
    type=click.Choice(DEMO_RECIPES),
    default=DEMO_RECIPES[0],
    show_default=True,
    help="text-digits: prompt -> image with the shipped text-to-image teacher; digits-pixel: "
    "the class-conditional pixel-space digits teacher, with an INT8 branch.",
)
@store_option
def demo(out: Path, recipe: str, store: Path | None) -> None:
    """Distil a shipped teacher to a few steps, compile its engines with onnxruntime, bundle
    them and profile them against the teacher (default: prompt -> image, text-digits)."""
    from accel.pipeline import default_store, run_recipe
    from accel.recipe import load_recipe

    artifacts = run_recipe(load_recipe(demo_recipe(recipe)), default_store(store))
    by_key = {a.key: a for a in artifacts}

    def place(a) -> str | None:
        """Where an artifact of the recipe goes in ``out`` (None: the report's files)."""
        if a.stage == "ort":
            parent = by_key.get(a.parent)
            return "engine-int8" if parent is not None and parent.stage == "quantize" else "engine"
        return {"checkpoint": "student", "bundle": "bundle"}.get(a.kind)

    placed = {name: a for a in artifacts if (name := place(a))}
    profile = next(a for a in artifacts if a.stage == "profile")

    def fill(tmp: Path) -> None:
        for name, a in placed.items():
            shutil.copytree(a.path, tmp / name)
        for f in profile.path.iterdir():
            if f.suffix in (".json", ".md", ".png") and f.name != "manifest.json":
                shutil.copy(f, tmp / f.name)

    _publish(out, fill)
    click.echo((out / "report.md").read_text())
    quantize = next((a for a in artifacts if a.stage == "quantize"), None)
    if quantize is not None and "fd_digits" in quantize.metrics["quality_gate"].get("parent", {}):
        gate = quantize.metrics["quality_gate"]
        before, after = gate["parent"]["fd_digits"], gate["candidate"]["fd_digits"]
        click.echo(
            f"INT8 engine (onnxruntime static INT8, in engine-int8/): FD-digits {after:.3f} "
            f"against {before:.3f} for the fp32 graph ({gate['value']:+.1%}; gate: at most "
            f"+{gate['threshold']:.0%}), {gate['samples']} samples, seed {gate['seeds'][0]}"
        )
    click.echo(
        f"wrote {out}/: {', '.join(f'{n}/' for n in sorted(placed))} (the bundle is deployable: "
        "examples/serve_bundle.py), report.json, report.md, plots"
    )


# ---------------------------------------------------------------- single stages


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
    shown = f"{text} (default: {_toml_literal(info.default)})".strip()
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
        {"ort": "ort", "tensorrt": "tensorrt", "aoti": "aoti", "torch": "torch_compile"},
        "Compile INPUT into an engine for --target: an ONNX artifact with onnxruntime (ort) or "
        "TensorRT (tensorrt, GPU targets), a student checkpoint with AOTInductor (aoti) or "
        "torch.compile of its fused sampler, replayed from CUDA graphs on GPUs (torch).",
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


@cli.group()
def deploy() -> None:
    """Deploy a bundle into a serving system."""


@deploy.command("triton")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The model repository to write (replaced if it exists).",
)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances per device (instance_group count).")  # fmt: skip
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=100, show_default=True,
              help="Dynamic batching: how long a request may wait for others.")  # fmt: skip
def deploy_triton(bundle: Path, out: Path, instances: int, max_queue_delay_us: int) -> None:
    """Write a Triton Inference Server model repository for BUNDLE: the fused-sampler engine as
    one model, or the denoiser engine with dynamic batching plus a Python-backend model that
    runs the sampler loop over it."""
    from accel.deploy.triton import MARKER, triton_repository

    dst, src = out.resolve(), bundle.resolve()
    if dst == src or dst in src.parents:
        raise click.BadParameter("the repository cannot hold the bundle itself", param_hint="--out")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / MARKER).is_file():
        raise click.BadParameter(
            f"{out} holds files that `accel deploy triton` did not write; name a new directory "
            "(a repository it wrote is replaced)",
            param_hint="--out",
        )
    names: list[str] = []
    _publish(
        out, lambda tmp: names.extend(triton_repository(bundle, tmp, instances, max_queue_delay_us))
    )
    click.echo(f"wrote {out}/: models {', '.join(names)} (clients call {names[0]!r})")


@cli.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--target",
    "target_name",
    default=None,
    help="Hardware target (profiles/ name or .toml path); default: `accel targets detect`.",
)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    type=click.Choice(["single_stream", "offline", "server"]),
    help="MLPerf LoadGen scenario, repeatable (default: the target's).",
)
@click.option("--batch", type=click.IntRange(min=1), help="Images per SingleStream/Server query.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="Server queries/s.")
@click.option(
    "--server-duration", type=click.FloatRange(min=0, min_open=True), help="Server seconds."
)
@click.option("--warmup-ms", type=click.FloatRange(min=0), help="Warm-up time per workload.")
@click.option("--warmup-iterations", type=click.IntRange(min=0), help="Warm-up calls.")
@click.option("--duration-ms", type=click.FloatRange(min=0), help="Timing per workload.")
@click.option("--iterations", type=click.IntRange(min=1), help="Fixed timed rounds (no duration).")
@click.option(
    "--quality-samples",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also measure FD-digits and class accuracy on this many samples (digits models).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("profile-out"),
    show_default=True,
    help="Where report.json, report.md and the plots go.",
)
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampling steps of diffusers directories (default: their own, or 50).")  # fmt: skip
@size_options
def profile(
    artifacts: tuple[Path, ...],
    target_name: str | None,
    scenarios: tuple[str, ...],
    batch: int | None,
    rate: float | None,
    server_duration: float | None,
    warmup_ms: float | None,
    warmup_iterations: int | None,
    duration_ms: float | None,
    iterations: int | None,
    quality_samples: int,
    out: Path,
    steps: int | None,
    height: int | None,
    width: int | None,
) -> None:
    """Measure the latency of ARTIFACTS (engines, or diffusers directories in eager torch) on a
    target, interleaved in one run: each query samples images end to end (noise -> image).

    Engines must have been built for the target. The report gives p50/p90/p95/p99 with
    confidence intervals, pairwise ratios, a per-stage breakdown, peak memory, the environment
    and the target's latency budget; compare two with `accel report compare`."""
    from accel.core.target import load_target
    from accel.profile.harness import Harness
    from accel.profile.stage import measure_quality, profile_runtimes
    from accel.report import write_report

    if 0 < quality_samples < 10:
        raise click.BadParameter(
            "use 0 (no quality) or at least 10", param_hint="--quality-samples"
        )
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").is_file():
        raise click.BadParameter(
            f"{out} holds files and no report.json; name a new or a report directory "
            "(it is replaced)",
            param_hint="--out",
        )
    target = load_target(target_name) if target_name else _detected()[0]
    resolution = _resolution(height, width)
    subjects = {}
    short = [p.resolve().name for p in artifacts]
    for path, label in zip(artifacts, short, strict=True):
        # onnxruntime's idle threads must not spin: they would take the cores of the next call
        runtime, plan = open_runtime(path, target, steps, spin=False, resolution=resolution)
        if quality_samples and plan.decode:
            raise click.BadParameter(
                "FD-digits measures the digits models only", param_hint="--quality-samples"
            )
        if short.count(label) > 1:  # two artifacts of one name: tell them apart by path
            label = str(path)
        name = f"{label} ({runtime.name}, {len(plan.steps)} steps)"
        if name in subjects:
            raise click.BadParameter(f"{path} is listed twice", param_hint="ARTIFACTS")
        subjects[name] = (runtime, plan)
    harness = Harness.of(
        target,
        warmup_ms=warmup_ms,
        warmup_iterations=warmup_iterations,
        duration_ms=duration_ms,
        iterations=iterations,
    )
    report = profile_runtimes(
        subjects,
        target,
        list(scenarios) or [target.scenarios.default],
        harness,
        batch=batch,
        rate_qps=rate,
        server_duration_s=server_duration,
        progress=lambda m: click.echo(m, err=True),
    )
    grids: dict = {}
    num_classes = next(iter(subjects.values()))[1].num_classes
    if quality_samples:
        report["quality"], grids = measure_quality(
            subjects, quality_samples, [0], lambda m: click.echo(m, err=True)
        )
    written: dict = {}
    _publish(out, lambda tmp: written.update(write_report(tmp, report, grids, num_classes)))
    click.echo((out / "report.md").read_text())
    click.echo(f"wrote {out}/: report.json, report.md, " + ", ".join(written["plots"]))


@cli.group()
def report() -> None:
    """Profile reports: compare two runs."""


@report.command("compare")
@click.argument("baseline", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option(
    "--threshold",
    type=click.FloatRange(min=0),
    default=0.10,
    show_default=True,
    help="Also ignore changes smaller than this fraction: the drift between runs that neither "
    "run can measure (asv's default factor 1.1; measure your machine's).",
)
@click.pass_context
def report_compare(ctx: click.Context, baseline: Path, candidate: Path, threshold: float) -> None:
    """Compare CANDIDATE's latency to BASELINE's (report.json files or report directories).

    The median latency per query of each workload and scenario in both (Server: p99 where both
    runs have enough queries for its interval). A regression is flagged only when the change
    exceeds the noise of both runs: the candidate's 95% interval lies wholly above the
    baseline's, and the change is larger than either run's coefficient of variation and
    --threshold. Exit code 1 on any regression, 2 on a bad report, for CI."""
    from accel.report import compare, compare_markdown, load_report

    rows, notes = compare(load_report(baseline), load_report(candidate), threshold)
    if not rows:
        raise click.UsageError("the reports share no scenario and workload to compare")
    click.echo(compare_markdown(rows, notes))
    regressions = [r for r in rows if r["verdict"] == "regression"]
    if regressions:
        click.echo(
            f"{len(regressions)} regression(s) beyond the noise of both runs: "
            + "; ".join(f"{r['scenario']} {r['workload']} {r['change']:+.1%}" for r in regressions),
            err=True,
        )
        ctx.exit(1)
    click.echo("no regression beyond the noise of both runs")


# ---------------------------------------------------------------- inspection


@cli.command()
@click.argument("artifact", type=click.Path(path_type=Path))
def inspect(artifact: Path) -> None:
    """Show an artifact's manifest: stage, config, lineage, target, metrics and files."""
    import json

    from accel.core.artifact import Artifact

    a = Artifact.load(artifact)
    a.verify()
    click.echo(f"{a.kind} from stage {a.stage!r}, key {a.key}, parent {a.parent or '-'}")
    if a.target:
        click.echo(f"target: {a.target['name']} ({a.target['fingerprint']})")
    click.echo("config: " + json.dumps(a.config))
    if a.metrics:
        click.echo("metrics: " + json.dumps(a.metrics, indent=2)[:4000])
    click.echo(f"files ({len(a.files)}, hashes verified):")
    for rel in sorted(a.files):
        click.echo(f"  {rel}  {(a.path / rel).stat().st_size} bytes")


@cli.group(invoke_without_command=True)
@click.pass_context
def targets(ctx: click.Context) -> None:
    """Hardware targets in profiles/ (lists them without a subcommand)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(targets_list)


@targets.command("list")
def targets_list() -> None:
    """List the known targets."""
    from accel.core.target import list_targets, load_target

    for name in list_targets():
        t = load_target(name)
        what = f"{t.gpu}, sm_{t.compute_capability.replace('.', '')}" if t.gpu else "CPU"
        click.echo(f"{name:<16} {t.device:<5} {t.fingerprint}  {what:<26} {t.description}")


@targets.command("show")
@click.argument("name")
def targets_show(name: str) -> None:
    """Show one target's fields and fingerprint."""
    import json

    from accel.core.target import load_target

    t = load_target(name)
    click.echo(json.dumps(dict(t.model_dump(mode="json"), fingerprint=t.fingerprint), indent=2))
    click.echo(f"trtexec shapes (a 4-channel input named sample): {t.shapes.trtexec()}")


def _detected():
    from accel.core.hardware import detect
    from accel.core.target import list_targets, load_target

    return detect([load_target(n) for n in list_targets()])


@targets.command("detect")
def targets_detect() -> None:
    """Name the target that fits this machine (NVML for GPUs, else CPU model and flags)."""
    target, why = _detected()
    click.echo(f"{target.name}  ({why})")


# ---------------------------------------------------------------- sampling


@cli.command()
@click.argument("model", metavar="MODEL_OR_ENGINE", type=click.Path(path_type=Path))
@click.option("--prompt", "prompts", multiple=True,
              help="Text prompt (repeatable; cycled over the images) for text-to-image models.")  # fmt: skip
@click.option("--label", "labels", multiple=True, type=click.IntRange(min=0),
              help="Class label (repeatable; cycled) for class-conditional models; "
              "default: the classes cycled.")  # fmt: skip
@click.option("-n", "num", type=click.IntRange(min=1), default=None,
              help="Number of images (default: one per prompt or label).")  # fmt: skip
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Sampling steps (default: the student's own, or 50 for a teacher).",
)
@click.option(
    "--guidance",
    type=float,
    default=None,
    help="Classifier-free guidance scale (default: the model's; students have it baked in). "
    "For models with a guidance embedding (Flux-dev), the embedded guidance.",
)
@size_options
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the noise (numpy default_rng), as the quality gate draws it.",
)
@click.option(
    "--target",
    "target_name",
    default=None,
    help="Refuse an engine built for another target than this one.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Output .npz with images (N x C x H x W float32 in [0, 1]), the prompts or labels, and "
    "the initial noise as latents; or a .png grid of the images.",
)
def sample(
    model: Path,
    prompts: tuple[str, ...],
    labels: tuple[int, ...],
    num: int | None,
    steps: int | None,
    guidance: float | None,
    height: int | None,
    width: int | None,
    seed: int,
    target_name: str | None,
    out: Path,
) -> None:
    """Sample images from a diffusers directory (torch eager) or an engine artifact (its runtime).

    The initial noise is numpy's default_rng(SEED).standard_normal in the layout the family's
    stock diffusers pipeline takes as its latents= argument (saved as `latents`), so that the
    stock pipeline given those latents draws the same images. Samplers: DDIM (trailing
    timesteps) for DDPM-family models, Euler on the flow ODE over the stock scheduler's sigmas
    for flow models, multistep consistency for consistency students."""
    import numpy as np

    from accel.core.target import load_target
    from accel.runtime import run_pipeline
    from accel.runtime.loop import check_finite
    from accel.runtime.pipeline import check_prompts

    if out.suffix not in (".npz", ".png"):
        raise click.BadParameter("name a .npz or a .png file", param_hint="--out")
    try:
        check_prompts(list(prompts))
    except ValueError as e:
        raise RecipeError(f"--prompt: {e}") from None
    target = load_target(target_name) if target_name else None
    resolution = _resolution(height, width)
    runtime, plan = open_runtime(model, target, steps, guidance, resolution=resolution)
    kind = plan.conditioning_kind or ("class" if plan.num_classes else None)
    if prompts and kind != "text":
        what = "class-conditional (give --label)" if kind == "class" else "not text-conditioned"
        raise RecipeError(f"{model} is {what}; it takes no --prompt")
    if labels and kind != "class":
        raise RecipeError(f"{model} is not class-conditional; it takes no --label")
    if kind == "text" and not prompts:
        raise RecipeError(f"{model} is a text-to-image model: give --prompt")
    if labels and plan.num_classes and max(labels) >= plan.num_classes:
        raise RecipeError(
            f"{model} has classes 0..{plan.num_classes - 1}; got --label {max(labels)}"
        )
    num = num or len(prompts) or len(labels) or None
    if num is None:
        raise RecipeError("how many images? give -n")
    noise = np.random.default_rng(seed).standard_normal((num, *plan.sample_shape))
    prompt_list = [prompts[i % len(prompts)] for i in range(num)] if prompts else None
    label_out = None
    if kind == "class":
        label_out = np.resize(np.asarray(labels or range(plan.num_classes), np.int64), num)
    # in batches of the target's largest (the default target's without --target), so that
    # memory follows the batch, not -n; one step-noise stream, as one batch would draw it
    batch = (target or load_target("cpu")).draw_batch
    step_noise = np.random.default_rng([seed, 1])
    images = np.concatenate(
        [
            run_pipeline(
                runtime,
                plan,
                noise[i : i + batch].astype(np.float32),
                None if prompt_list is None else prompt_list[i : i + batch],
                None if label_out is None else label_out[i : i + batch],
                step_noise,
            )
            for i in range(0, num, batch)
        ]
    )
    if not plan.decode:
        images = np.clip(images, -1, 1)
    check_finite(images, str(model))
    images01 = np.clip((images + 1) / 2, 0, 1).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        from accel.report import rgb_grid

        tmp = out.with_name(f".{out.name}.tmp.png")
        rgb_grid(images01).save(tmp)
    else:
        fields = {"images": images01, "latents": noise.astype(np.float32)}
        if prompts:
            fields["prompts"] = np.asarray(prompt_list)
        fields["labels"] = (
            np.full(num, -1, np.int64) if label_out is None else label_out.astype(np.int64)
        )
        tmp = out.with_name(f".{out.name}.tmp.npz")
        np.savez(tmp, **fields)
    os.replace(tmp, out)
    click.echo(f"wrote {num} images {list(images.shape[1:])} to {out}")


if __name__ == "__main__":
    main()
