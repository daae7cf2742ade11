"""The schema of ``report.json`` (``accel.report/2``, documented in docs/report-schema.md): typed
records of every figure, open to extra keys, and ``load_report``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from accel.core.errors import ReportError

TOP_LEVEL_EXCLUDED = ("h2d", "d2h", "compute")
"""Breakdown sections nested inside a denoising step (a GPU runtime's copies and kernels)."""


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


class ChainRow(_Open):
    """One stage that made the profiled engine: its wall time and peak memory (MB)."""

    stage: str
    key: str
    wall_seconds: float | None = Field(None, ge=0)
    peak_rss_mb: float | None = Field(None, gt=0)
    peak_child_rss_mb: float | None = Field(None, ge=0)
    peak_gpu_mb: float | None = Field(None, ge=0)


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
    chain: list[ChainRow] | None = None


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
