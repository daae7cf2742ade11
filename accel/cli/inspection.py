"""`accel inspect` (an artifact's manifest) and `accel targets` (the hardware targets)."""

from __future__ import annotations

from pathlib import Path

import click

from accel.cli import (
    cli,
)


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
