"""PNG plots and sample grids of a report."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from accel.report.schema import TOP_LEVEL_EXCLUDED


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
