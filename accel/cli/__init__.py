"""The `accel` command line. Heavy libraries (torch, diffusers, onnx) are imported inside commands,
so `accel --help` stays instant. User errors (AccelError) print one message and exit non-zero."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

from accel.core.errors import AccelError

store_option = click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Artifact store (default: $ACCEL_STORE or ./.accel-store).",
)


def source_options(f):
    """--revision and --variant of a model named by a Hub id or folder (``accel.core.hub``)."""
    f = click.option("--variant", default=None,
                     help="Weights variant to read (fp16: the *.fp16.safetensors files).")(f)  # fmt: skip
    return click.option("--revision", default=None,
                        help="Hub revision (branch, tag or commit) of a Hub id.")(f)  # fmt: skip


def size_options(f):
    """--height and --width of the images latent models draw (default: the model's own)."""
    for side in ("width", "height"):
        f = click.option(f"--{side}", type=click.IntRange(min=1), default=None,
                         help=f"Image {side} for latent models (default: the model's own).")(f)  # fmt: skip
    return f


def open_model_or_engine(
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


# ---------------------------------------------------------------- helpers of several commands


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


# the command groups register themselves on `cli` (imported last: they import the helpers above)
from accel.cli import deploy, inspection, profiling, recipes, sampling, stages  # noqa: E402
from accel.cli.recipes import DEMO_RECIPES, demo_recipe  # noqa: E402
from accel.cli.stages import StageCommand  # noqa: E402

__all__ = [
    "DEMO_RECIPES",
    "StageCommand",
    "cli",
    "demo_recipe",
    "deploy",
    "inspection",
    "main",
    "profiling",
    "recipes",
    "sampling",
    "stages",
]
