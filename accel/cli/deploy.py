"""`accel deploy triton`: a bundle as a Triton Inference Server model repository."""

from __future__ import annotations

from pathlib import Path

import click

from accel.cli import (
    _publish,
    cli,
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
