"""`accel run`, `accel plan` and `accel demo`: recipes end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import click

from accel.cli import (
    _publish,
    cli,
    resume_option,
    store_option,
)

RECIPES = Path(__file__).parents[1] / "recipes"
DEMO_RECIPES = ("text-digits", "digits-pixel")  # the first is `accel demo`'s default


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
