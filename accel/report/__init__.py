"""Profile reports: the machine-readable ``report.json`` (schema ``accel.report/2``, documented in
docs/report-schema.md and checked by ``Report``), a Markdown summary, PNG plots and sample grids;
and ``compare``, which flags a regression between two reports only where it exceeds the noise of
both runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from accel.report.compare import compare, compare_markdown
from accel.report.markdown import markdown
from accel.report.plots import image_grid, plots, rgb_grid, slug
from accel.report.schema import Report, load_report

__all__ = [
    "Report",
    "compare",
    "compare_markdown",
    "image_grid",
    "load_report",
    "markdown",
    "plots",
    "rgb_grid",
    "write_report",
]


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
