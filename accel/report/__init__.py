"""Profile reports: the machine-readable ``report.json`` (schema ``accel.report/2``, documented in
docs/report-schema.md and checked by ``Report``), a Markdown summary, PNG plots and sample grids;
and ``compare``, which flags a regression between two reports only where it exceeds the noise of
both runs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from accel.core.errors import ReportError

TOP_LEVEL_EXCLUDED = ("h2d", "d2h", "compute")
"""Breakdown sections nested inside a denoising step (a GPU runtime's copies and kernels)."""


# ---------------------------------------------------------------- schema


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


Interval = list[float] | None  # [low, high], None where there are too few samples for one


class LatencyStats(_Open):
    p50: float = Field(gt=0)
    p90: float = Field(gt=0)
    p95: float = Field(gt=0)
    p99: float = Field(gt=0)
    min: float = Field(gt=0)
    max: float = Field(gt=0)
    mean: float = Field(gt=0)
    std: float = Field(ge=0)
    cv: float = Field(ge=0)
    n: int = Field(ge=1)
    p50_ci: Interval
    p90_ci: Interval
    p99_ci: Interval = None

    @model_validator(mode="after")
    def _ordered(self) -> LatencyStats:
        eps = 1e-9 * max(1.0, abs(self.max))
        chain = [self.min, self.p50, self.p90, self.p95, self.p99, self.max]
        if any(a > b + eps for a, b in zip(chain, chain[1:], strict=False)):
            raise ValueError(f"need min <= p50 <= p90 <= p95 <= p99 <= max, got {chain}")
        for ci in (self.p50_ci, self.p90_ci, self.p99_ci):
            if ci is not None and (len(ci) != 2 or ci[0] > ci[1]):
                raise ValueError(f"a confidence interval must be [low, high], got {ci}")
        return self


def _counted(stats: LatencyStats | None, samples: list[float], what: str) -> None:
    if (stats.n if stats else 0) != len(samples):
        raise ValueError(
            f"latency_ms.n is {stats.n if stats else 'null'} but {len(samples)} {what} are listed"
        )


class TimedResult(_Open):
    latency_ms: LatencyStats
    times_ms: list[float]
    warmup: dict
    memory: dict
    images_per_s: float = Field(gt=0)

    @model_validator(mode="after")
    def _counted(self) -> TimedResult:
        _counted(self.latency_ms, self.times_ms, "timings")
        return self


class Ratio(_Open):
    baseline: str
    subject: str
    ratio_of_medians: float
    paired_median: float
    paired_ci: Interval
    rounds: int


class TimedScenario(_Open):
    batch: int = Field(ge=1)
    metric: str
    results: dict[str, TimedResult]
    ratios: list[Ratio]


class ServerResult(_Open):
    rate_qps: float = Field(gt=0)
    duration_s: float = Field(gt=0)
    queries: int = Field(ge=0)
    unserved: int = Field(ge=0)
    achieved_qps: float = Field(ge=0)
    utilization: float = Field(ge=0)
    latency_ms: LatencyStats | None
    latencies_ms: list[float]
    bound_ms: float | None
    p99_within_bound: bool | None

    @model_validator(mode="after")
    def _counted(self) -> ServerResult:
        _counted(self.latency_ms, self.latencies_ms, "query latencies")
        if self.queries != len(self.latencies_ms) + self.unserved:
            raise ValueError("queries must equal the latencies listed plus the unserved")
        return self


class ServerScenario(_Open):
    batch: int = Field(ge=1)
    rate_qps: float
    duration_s: float
    bound_ms: float | None
    metric: Literal["p99"]
    results: dict[str, ServerResult]


class Scenarios(BaseModel):
    model_config = ConfigDict(extra="forbid")
    single_stream: TimedScenario | None = None
    offline: TimedScenario | None = None
    server: ServerScenario | None = None


class TargetRef(_Open):
    name: str
    fingerprint: str
    latency_budget_ms: float | None = None


class HarnessRef(_Open):
    warmup_iterations: int
    warmup_ms: float
    iterations: int | None
    duration_ms: float
    min_iterations: int
    timer: Literal["host", "cuda"]


class Environment(_Open):
    cpu: str
    cpu_flags: list[str]
    logical_cores: int | None
    platform: str
    python: str
    versions: dict[str, str]
    gpus: list[dict] | None = None


class Budget(_Open):
    latency_budget_ms: float
    results: dict[str, dict]


class Quality(_Open):
    fd_digits: float
    class_accuracy: float


class Report(_Open):
    schema_: Literal["accel.report/2"] = Field(alias="schema")
    created: str
    target: TargetRef
    harness: HarnessRef
    environment: Environment
    workloads: dict[str, dict]
    scenarios: Scenarios
    breakdown: dict[str, dict[str, dict]]
    warnings: list[str]
    budget: Budget | None = None
    quality: dict[str, Quality] | None = None


def load_report(path: str | Path) -> dict:
    """A report.json (or a report directory holding one), validated; ReportError otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise ReportError(f"report not found: {path}; give a report.json written by accel profile")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(
            f"{path} is not JSON ({e}); give a report.json written by accel profile"
        ) from None
    if not isinstance(data, dict) or data.get("schema") != "accel.report/2":
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ReportError(
            f"{path} is not an accel.report/2 report (schema: {found!r}); reprofile it with "
            "this version of accel"
        )
    try:
        Report.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ReportError(
            f"{path} does not follow the accel.report/2 schema at {where}: {first['msg']} "
            f"({e.error_count()} problem(s); see docs/report-schema.md)"
        ) from None
    return data


# ---------------------------------------------------------------- compare


def _metric(scenario: str, sa: dict, sb: dict) -> str:
    """What `compare` judges (lower is better). SingleStream and Offline: the median latency per
    query (MLPerf's SingleStream p90 needs 53 calls for a 95% interval; the median 8).
    Server: p99 of query latency where both runs have enough queries for its interval, else
    the median."""
    if scenario == "server" and sa.get("p99_ci") and sb.get("p99_ci"):
        return "p99"
    return "p50"


DEFAULT_THRESHOLD = 0.10
"""Run-to-run drift that one run cannot see; 10% is asv's default factor (1.1). Consecutive
identical profiles on the shared 2-core CI machine differed by 3% to 22% in medians whose
intervals did not overlap (docs/BENCHMARKS.md): set it from your machine's own drift."""


def compare(a: dict, b: dict, threshold: float = DEFAULT_THRESHOLD) -> tuple[list[dict], list[str]]:
    """Per scenario and workload in both reports: B's headline latency against A's. A regression
    is B worse than A beyond the noise of both runs: B's 95% interval lies wholly above A's (the
    sampling noise of each run's statistic), and the relative change exceeds each run's
    coefficient of variation (the spread of one call) and ``threshold`` (the drift between runs
    that neither run can measure). An improvement is the mirror image. A Server run that leaves
    queries unserved where the baseline served them all is a regression whatever its latency.
    Also notes that make the comparison suspect: other targets, machines, batches or rates."""
    rows, notes = [], []
    for scenario in ("single_stream", "offline", "server"):
        sa, sb = a["scenarios"].get(scenario), b["scenarios"].get(scenario)
        if not sa or not sb:
            continue
        for key in ("batch", "rate_qps"):
            if sa.get(key) != sb.get(key):
                notes.append(f"{scenario}: {key} {sa.get(key)} in A, {sb.get(key)} in B")
        for name in sa["results"]:
            if name not in sb["results"]:
                continue
            ra, rb = sa["results"][name], sb["results"][name]
            newly_unserved = scenario == "server" and rb["unserved"] > 0 and ra["unserved"] == 0
            if ra["latency_ms"] is None or rb["latency_ms"] is None:
                notes.append(f"{scenario}, {name}: a run served no query, no latency to compare")
                continue
            sta, stb = ra["latency_ms"], rb["latency_ms"]
            metric = _metric(scenario, sta, stb)
            va, vb, ca, cb = sta[metric], stb[metric], sta[f"{metric}_ci"], stb[f"{metric}_ci"]
            change = vb / va - 1
            floor = max(threshold, sta["cv"], stb["cv"])
            if newly_unserved:
                verdict = "regression"
                notes.append(f"{scenario}, {name}: {rb['unserved']} queries left unserved")
            elif ca is None or cb is None:
                verdict = "too few samples"
            elif cb[0] > ca[1] and change > floor:
                verdict = "regression"
            elif cb[1] < ca[0] and -change > floor:
                verdict = "improvement"
            else:
                verdict = "within noise"
            rows.append(
                dict(
                    scenario=scenario,
                    workload=name,
                    metric=metric,
                    a=va,
                    a_ci=ca,
                    b=vb,
                    b_ci=cb,
                    change=change,
                    noise_floor=floor,
                    verdict=verdict,
                )
            )
    if a["target"]["fingerprint"] != b["target"]["fingerprint"]:
        notes.append(
            f"the reports are for different targets ({a['target']['name']} "
            f"{a['target']['fingerprint']}, {b['target']['name']} {b['target']['fingerprint']})"
        )
    ea, eb = a["environment"], b["environment"]
    if (ea.get("cpu"), _gpu_names(ea)) != (eb.get("cpu"), _gpu_names(eb)):
        notes.append(
            f"measured on different machines ({ea.get('cpu')} {_gpu_names(ea)} vs "
            f"{eb.get('cpu')} {_gpu_names(eb)})"
        )
    return rows, notes


def _gpu_names(env: dict) -> list[str]:
    return [g["name"] for g in env.get("gpus") or []]


def compare_markdown(rows: list[dict], notes: list[str]) -> str:
    lines = [
        "| scenario | workload | metric | A (ms) [95% CI] | B (ms) [95% CI] | change | noise "
        "floor | verdict |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]

    def ci(c) -> str:
        return "[too few samples]" if c is None else f"[{c[0]:.3f}, {c[1]:.3f}]"

    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['workload']} | {r['metric']} | {r['a']:.3f} {ci(r['a_ci'])} "
            f"| {r['b']:.3f} {ci(r['b_ci'])} | {r['change']:+.1%} | {r['noise_floor']:.1%} | "
            f"{r['verdict']} |"
        )
    lines += [f"\nnote: {n}" for n in notes]
    return "\n".join(lines)


# ---------------------------------------------------------------- Markdown


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def markdown(report: dict) -> str:
    t, env = report["target"], report["environment"]
    budget = t.get("latency_budget_ms")
    lines = [
        f"# accel report: target `{t['name']}`",
        "",
        f"Target fingerprint {t['fingerprint']}; latency budget "
        f"{f'{budget:g} ms (SingleStream p90)' if budget else 'none'}. "
        + _harness_line(report["harness"]),
        "",
    ]
    if report.get("quality"):
        lines += _quality_lines(report)
    if report.get("speedup_end_to_end_p50"):
        lines += [
            f"End-to-end speedup of the student engine over the teacher in eager torch "
            f"(SingleStream p50): **{report['speedup_end_to_end_p50']:.1f}x**.",
            "",
        ]
    for scenario in ("single_stream", "offline"):
        s = report["scenarios"].get(scenario)
        if not s:
            continue
        title = "SingleStream (p90)" if scenario == "single_stream" else "Offline (throughput)"
        lines += [
            f"## {title}, batch {s['batch']}: latency per query (ms)",
            "",
            "| workload | p50 | p90 | p95 | p99 | min | max | mean | CV | n (warm-up) | "
            "images/s | peak RSS MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in s["results"].items():
            st, mem = r["latency_ms"], r["memory"]
            lines.append(
                f"| {name} | {_ms(st['p50'])} | {_ms(st['p90'])} | {_ms(st['p95'])} | "
                f"{_ms(st['p99'])} | {_ms(st['min'])} | {_ms(st['max'])} | {_ms(st['mean'])} | "
                f"{st['cv']:.1%} | {st['n']} ({r['warmup']['iterations']}) | "
                f"{r['images_per_s']:.1f} | {mem.get('host_rss_peak_mib', float('nan')):.0f} |"
            )
        if s["ratios"]:
            lines += [
                "",
                "Pairwise, from the interleaved rounds (baseline time / subject time):",
                "",
                "| baseline | subject | ratio of medians | paired median [95% CI] |",
                "|---|---|---:|---:|",
            ]
            for r in s["ratios"]:
                lines.append(
                    f"| {r['baseline']} | {r['subject']} | {r['ratio_of_medians']:.2f}x | "
                    f"{r['paired_median']:.2f}x "
                    + (
                        f"[{r['paired_ci'][0]:.2f}, {r['paired_ci'][1]:.2f}] |"
                        if r["paired_ci"]
                        else "[too few rounds] |"
                    )
                )
        lines.append("")
    s = report["scenarios"].get("server")
    if s:
        lines += [
            f"## Server: Poisson arrivals, {s['rate_qps']:g} queries/s for {s['duration_s']:g} s, "
            f"batch {s['batch']} (latency includes queueing)",
            "",
            "| workload | queries | unserved | achieved q/s | utilization | p50 | p99 | bound | "
            "p99 within bound |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in s["results"].items():
            st = r["latency_ms"] or {}
            lines.append(
                f"| {name} | {r['queries']} | {r['unserved']} | {r['achieved_qps']:.1f} | "
                f"{r['utilization']:.0%} | {_ms(st.get('p50', float('nan')))} | "
                f"{_ms(st.get('p99', float('nan')))} | {r['bound_ms'] or '-'} | "
                f"{'-' if r['p99_within_bound'] is None else 'yes' if r['p99_within_bound'] else 'NO'} |"
            )
        lines.append("")
    if report.get("budget"):
        b = report["budget"]
        lines += [f"## Latency budget: {b['latency_budget_ms']:g} ms at SingleStream p90", ""]
        lines += [
            f"- {name}: p90 {_ms(r['p90_ms'])} ms, {'within budget' if r['met'] else 'OVER budget'}"
            for name, r in b["results"].items()
        ]
        lines.append("")
    lines += _breakdown_lines(report["breakdown"])
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    gpus = env.get("gpus") or []
    lines += [
        "## Environment",
        "",
        f"{env['cpu']}, {env['logical_cores']} logical cores ({env.get('affinity_cores')} usable), "
        f"torch threads {env.get('threads')}; SIMD: {' '.join(env['cpu_flags']) or 'unknown'}; "
        f"{env['platform']}, Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
        "",
    ]
    for g in gpus:
        clocks = g.get("clocks") or {}
        sm = clocks.get("sm_mhz") or {}
        lines.append(
            f"GPU {g['index']}: {g['name']}, compute capability {g['compute_capability']}, "
            f"driver {g['driver']}, SM clock {sm.get('current')}/{sm.get('max')} MHz, power "
            f"{g.get('power_w')}/{g.get('power_limit_w')} W, throttle reasons "
            f"{', '.join(g.get('throttle_reasons') or []) or 'none'}."
        )
    return "\n".join(lines) + "\n"


def _harness_line(h: dict) -> str:
    count = (
        f"{h['iterations']} iterations"
        if h.get("iterations")
        else (f"{h['duration_ms']:g} ms per workload and at least {h['min_iterations']} iterations")
    )
    return (
        f"Harness: warm-up {h['warmup_iterations']} calls and {h['warmup_ms']:g} ms per workload, "
        f"then {count}, workloads interleaved; timer: "
        f"{'CUDA events' if h['timer'] == 'cuda' else 'perf_counter_ns'}."
    )


def _quality_lines(report: dict) -> list[str]:
    lines = ["## Quality", ""]
    if "quality_seeds" in report:
        floor = report.get("fd_floor")
        lines += [
            f"Mean of seeds {report['quality_seeds']}, {report['quality_samples']} samples each."
            + (f" FD-digits floor (two halves of the real digits): {floor:.3f}." if floor else ""),
            "",
        ]
    lines += ["| sampler | FD-digits | class accuracy |", "|---|---:|---:|"]
    for name, v in report["quality"].items():
        lines.append(f"| {name} | {v['fd_digits']:.3f} | {100 * v['class_accuracy']:.1f}% |")
    return lines + [""]


def _breakdown_lines(breakdown: dict) -> list[str]:
    if not breakdown:
        return []
    pixels = not any("vae decode" in sections for sections in breakdown.values())
    lines = [
        "## Per-stage breakdown of one SingleStream query (ms, p50 over the recorded calls)",
        "",
        "Copies (h2d, d2h) and compute are parts of the denoising step they happen in."
        + (" There is no VAE decode: the model samples pixels." if pixels else ""),
        "",
    ]
    for name, sections in breakdown.items():
        steps = {k: v for k, v in sections.items() if k.startswith("step ")}
        if len(steps) > 8:  # many steps: their total and spread instead of one entry each
            p50s = [v["p50"] for v in steps.values()]
            shown = {k: _ms(v["p50"]) for k, v in sections.items() if k not in steps}
            shown = {
                f"{len(steps)} denoising steps": f"{_ms(sum(p50s))} (per step {_ms(min(p50s))}"
                f"-{_ms(max(p50s))}, median {_ms(float(np.median(p50s)))})",
                **shown,
            }
        else:
            shown = {k: _ms(v["p50"]) for k, v in sections.items()}
        lines.append(f"- **{name}**: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    return lines + [""]


# ---------------------------------------------------------------- PNGs


def image_grid(images: np.ndarray, labels: np.ndarray | None, per_class: int = 10, scale: int = 4):
    """A PIL image: one row per class (first ``per_class`` samples of it), images in [-1, 1]."""
    from PIL import Image

    if labels is None:
        rows = [images[i * per_class : (i + 1) * per_class] for i in range(per_class)]
    else:
        rows = [images[labels == c][:per_class] for c in np.unique(labels)]
    c, h, w = images.shape[1:]
    canvas = np.zeros((len(rows) * (h + 1), per_class * (w + 1)), np.float32)
    for r, row in enumerate(rows):
        for k, img in enumerate(row):
            canvas[r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = img.mean(0)
    pixels = ((np.clip(canvas, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    pil = Image.fromarray(pixels, mode="L")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


def rgb_grid(images01: np.ndarray, columns: int = 8):
    """A PIL image of images in [0, 1] (N x C x H x W, C = 1 or 3), ``columns`` per row."""
    from PIL import Image

    n, c, h, w = images01.shape
    rows = -(-n // columns)
    cols = min(n, columns)
    canvas = np.ones((rows * (h + 1), cols * (w + 1), 3), np.float32)
    for i, img in enumerate(images01):
        r, k = divmod(i, columns)
        rgb = np.repeat(img, 3, axis=0) if c == 1 else img[:3]
        canvas[r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = rgb.transpose(
            1, 2, 0
        )
    return Image.fromarray((canvas * 255).round().astype(np.uint8), mode="RGB")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def plots(report: dict, out: Path) -> list[str]:
    """latency.png (distribution per workload and scenario), breakdown.png (stacked stages of one
    query) and, when the report has quality, quality_latency.png. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    timed = [(k, s) for k, s in report["scenarios"].items() if s and k != "server"]
    server = report["scenarios"].get("server")
    panels = timed + ([("server", server)] if server else [])
    if panels:
        fig, axes = plt.subplots(
            len(panels),
            1,
            figsize=(8, 1.2 + 0.7 * len(report["workloads"]) * len(panels)),
            squeeze=False,
        )
        for ax, (scenario, s) in zip(axes[:, 0], panels, strict=True):
            names = list(s["results"])
            data = [
                s["results"][n]["latencies_ms" if scenario == "server" else "times_ms"] or [np.nan]
                for n in names
            ]
            ax.boxplot(data, orientation="horizontal", whis=(1, 99), flierprops={"markersize": 2})
            ax.set_yticks(range(1, len(names) + 1), names, fontsize=7)
            ax.set_xscale("log")
            ax.set_xlabel("latency per query (ms, log); whiskers p1-p99")
            ax.set_title(f"{scenario}, batch {s['batch']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=110)
        plt.close(fig)
        written.append("latency.png")
    if report["breakdown"]:
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(report["breakdown"])))
        names = list(report["breakdown"])
        colors: dict[str, tuple] = {}
        cmap = plt.get_cmap("tab20")
        for i, name in enumerate(names):
            left = 0.0
            for sec, v in report["breakdown"][name].items():
                if sec in TOP_LEVEL_EXCLUDED:
                    continue
                key = "denoising step" if sec.startswith("step ") else sec
                if key not in colors:
                    colors[key] = cmap(len(colors))
                ax.barh(
                    i,
                    v["p50"],
                    left=left,
                    color=colors[key],
                    edgecolor="white",
                    label=key if key not in ax.get_legend_handles_labels()[1] else None,
                )
                left += v["p50"]
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("ms per query (p50 of each stage)")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "breakdown.png", dpi=110)
        plt.close(fig)
        written.append("breakdown.png")
    quality = report.get("quality") or {}
    first = timed[0][1] if timed else None
    points = [
        (n, first["results"][n]["latency_ms"]["p50"], q["fd_digits"])
        for n, q in quality.items()
        if first and n in first["results"]
    ]
    if points:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for n, x, y in points:
            ax.scatter(x, y, label=n)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"latency per query, {timed[0][0]} p50 (ms, log)")
        ax.set_ylabel("FD-digits (lower is better)")
        fig.tight_layout()
        fig.savefig(out / "quality_latency.png", dpi=110)
        plt.close(fig)
        written.append("quality_latency.png")
    return written


def write_report(
    out: Path, report: dict, grids: dict[str, np.ndarray] | None = None, num_classes=None
) -> dict:
    """report.json, report.md, the plots and one sample-grid PNG per sampler into ``out``; the
    report as written (with the files it names)."""
    report = dict(report, grids={})
    for name, images in (grids or {}).items():
        labels = (np.arange(len(images)) % num_classes) if num_classes else None
        file = f"grid_{slug(name)}.png"
        image_grid(images, labels).save(out / file)
        report["grids"][name] = file
    report["plots"] = plots(report, out)
    Report.model_validate(report)  # a report that breaks its own schema is a bug
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report
