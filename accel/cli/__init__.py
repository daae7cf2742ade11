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


def console() -> None:
    """The ``accel`` command: ``main`` in a forked child, watched. Linux's out-of-memory killer
    ends a process with SIGKILL, which no handler sees; the parent then says in one line which
    stage died and at what peak memory (the child's ``ru_maxrss``), and removes the child's
    scratch files (its ``TMPDIR``, a directory of this run's own: quantizer and exporter
    scratch that a killed child cannot remove). The store's pending artifacts are removed by
    the next run (``Store.clean_tmp``). Under ``accelerate launch`` / ``torchrun`` (``RANK``
    set), and where there is no ``fork``, ``main`` runs in this process."""
    if not hasattr(os, "fork") or "RANK" in os.environ or os.environ.get("ACCEL_STAGE_FILE"):  # noqa: SIM112
        main()
        return
    import signal

    from accel.core.memory import STAGE_FILE_ENV

    run_dir = tempfile.mkdtemp(prefix="accel-run-")
    status = Path(run_dir, "stage")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",  # kept across runs, not in the run's TMPDIR
                          str(Path(tempfile.gettempdir(), f"torchinductor_{_user()}")))  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the run itself: it dies with its parent (a SIGKILL of `accel` ends the run)
        _die_with(parent)
        os.environ[STAGE_FILE_ENV] = str(status)
        os.environ["TMPDIR"] = run_dir
        tempfile.tempdir = None  # gettempdir() reads TMPDIR again
        os._exit(_child(main))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child (same group)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
    while True:
        try:
            _, code, usage = os.wait4(pid, 0)
            break
        except InterruptedError:
            continue
    noted = status.read_text().splitlines() if status.is_file() else []
    shutil.rmtree(run_dir, ignore_errors=True)
    if os.WIFEXITED(code):
        sys.exit(os.WEXITSTATUS(code))
    sig = os.WTERMSIG(code)
    if sig == signal.SIGKILL:
        click.echo(f"error: {killed_message(noted, usage.ru_maxrss * 1024)}", err=True)
    sys.exit(128 + sig)


def _die_with(parent: int) -> None:
    """Linux's PR_SET_PDEATHSIG: this process gets SIGKILL when its parent dies; where the
    parent is already gone (or prctl is missing), it ends now."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(128 + signal.SIGKILL)


def _child(run) -> int:
    """``run()``'s exit code, as the interpreter would exit with it; the caller ends the forked
    process with ``os._exit`` so that it never returns into the parent's code."""
    code = 1
    try:
        run()
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def killed_message(noted: list[str], peak: int) -> str:
    """The line for a run the kernel killed: ``noted`` is what the run wrote when its last stage
    started (``accel.core.memory.note_stage``: the stage, what to try), empty outside stages."""
    from accel.core.memory import gigabytes, machine_bytes

    total = machine_bytes()
    where = f"the {noted[0]} stage" if noted else "accel"
    of = f" of this machine's {gigabytes(total)}" if total else ""
    tries = (
        noted[1] if len(noted) > 1 else "try a smaller batch, fewer images or a lower resolution"
    )
    return (
        f"{where} was killed by the kernel (SIGKILL) at a peak of {gigabytes(peak)} resident"
        f"{of}: out of memory, most likely (the kernel's log, `dmesg`, says so); the store keeps "
        f"only completed stages; {tries}"
    )


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


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
    except (MemoryError, RuntimeError) as e:  # outside a stage (a stage's is a StageError)
        from accel.core.memory import asked_bytes, gigabytes
        from accel.pipeline import out_of_memory

        if not out_of_memory(e):
            raise
        asked = asked_bytes(e)
        size = f" (an allocation of {gigabytes(asked)} failed)" if asked else ""
        click.echo(
            f"error: out of memory{size}: a size asked for (images, batch, samples, resolution) "
            "needs more memory than this machine has; ask for less",
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
