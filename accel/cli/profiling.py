"""`accel profile` and `accel report compare`: latency and quality, and comparing two runs."""

from __future__ import annotations

from pathlib import Path

import click

from accel.cli import (
    _publish,
    _resolution,
    cli,
    open_model_or_engine,
    size_options,
)
from accel.cli.inspection import _detected


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
        runtime, plan = open_model_or_engine(path, target, steps, spin=False, resolution=resolution)
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
