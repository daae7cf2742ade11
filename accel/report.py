"""Reports for people: a Markdown table and sample grids beside the machine-readable report.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np


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


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def markdown(report: dict) -> str:
    lat, q = report["latency_ms"], report["quality"]
    env = report["environment"]
    lines = [
        f"# accel report: target `{report['target']['name']}`",
        "",
        f"Batch {report['batch_size']}, guidance scale {report['guidance_scale']} "
        f"(the teacher applies it with a doubled batch; the student has it distilled in).",
        "",
        "## Quality",
        "",
        f"Mean of seeds {report['quality_seeds']}, {report['quality_samples']} samples each. "
        f"FD-digits floor (two halves of the real digits): {report['fd_floor']:.3f}.",
        "",
        "| sampler | FD-digits | class accuracy |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {name} | {v['fd_digits']:.3f} | {100 * v['class_accuracy']:.1f}% |"
        for name, v in q.items()
    ]
    lines += [
        "",
        "## Latency (ms)",
        "",
        f"End-to-end speedup of the student engine over the teacher in eager torch (p50): "
        f"**{report['speedup_end_to_end_p50']:.1f}x**.",
        "",
        "| workload | p50 | p90 | p99 | min | max | mean | n (warm-up) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group in ("per_step", "end_to_end"):
        for name, s in lat[group].items():
            lines.append(
                f"| {name} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | "
                f"{s['min']:.2f} | {s['max']:.2f} | {s['mean']:.2f} | {s['n']} ({s['warmup']}) |"
            )
    lines += [
        "",
        "## Environment",
        "",
        f"{env['cpu']}, {env['logical_cores']} logical cores, torch threads {env['threads']}; "
        f"SIMD: {' '.join(env['cpu_flags']) or 'unknown'}; {env['platform']}, Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out: Path, report: dict, grids: dict[str, np.ndarray], num_classes: int | None
) -> None:
    """report.json, report.md and one sample-grid PNG per sampler into ``out``."""
    report = dict(report, grids={})
    for name, images in grids.items():
        labels = (np.arange(len(images)) % num_classes) if num_classes else None
        file = f"grid_{slug(name)}.png"
        image_grid(images, labels).save(out / file)
        report["grids"][name] = file
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
