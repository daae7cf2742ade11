"""One comparator across runtimes, after Polygraphy's Comparator: the same feeds through every
runtime, error statistics per output against a reference, and one tolerance table per precision.
NaN or Inf in any output always fails."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from accel.core.memory import give_back
from accel.runtime import Runtime

# |out - ref| <= atol + rtol * |ref| elementwise (numpy.allclose semantics)
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"atol": 1e-4, "rtol": 1e-4},
    "fp16": {"atol": 2e-2, "rtol": 2e-2},
    "tf32": {"atol": 2e-2, "rtol": 2e-2},  # fp32 tensors, matmuls with fp16's 10-bit mantissa
    "bf16": {"atol": 5e-2, "rtol": 5e-2},
}


def error_stats(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    abs_err = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    rel_err = abs_err / np.maximum(np.abs(ref.astype(np.float64)), 1e-12)
    return {
        "max_abs": float(abs_err.max()),
        "mean_abs": float(abs_err.mean()),
        "p99_abs": float(np.percentile(abs_err, 99)),
        "max_rel": float(rel_err.max()),
        "mean_rel": float(rel_err.mean()),
        "p99_rel": float(np.percentile(rel_err, 99)),
    }


def compare(
    reference: Runtime,
    others: list[Runtime | Callable[[], Runtime]],
    feeds: list[dict[str, np.ndarray]],
    precision: str = "fp32",
    judged: set[str] | None = None,
    then: Callable[[], None] | None = None,
) -> dict:
    """Run every feed through ``reference`` and ``others``; per runtime and output, the worst
    statistics over the feeds and whether all outputs are within tolerance. Only the outputs in
    ``judged`` (default: all) must be within tolerance to pass; every output must be finite and
    of the reference's shape, and every output's statistics are reported. ``then`` runs once the
    reference's outputs are computed (to release the reference's memory)."""
    tol = TOLERANCES[precision]
    report: dict = {"precision": precision, "tolerance": tol, "runtimes": {}, "passed": True}
    if judged is not None:
        report["judged"] = sorted(judged)
    refs = [reference.infer(f) for f in feeds]
    if then is not None:
        then()
    for entry in others:
        # a runtime, or a function that opens one: then it is open only while it is compared
        # (two onnxruntime sessions of a 3.4 GB UNet would hold the weights twice)
        rt = entry if hasattr(entry, "infer") else entry()
        worst: dict[str, dict] = {}
        ok = True
        for ref_out, feed in zip(refs, feeds, strict=True):
            out = rt.infer(feed)
            for name, ref in ref_out.items():
                got = out[name]
                same_shape = got.shape == ref.shape
                finite = bool(np.isfinite(got).all() and np.isfinite(ref).all())
                stats = error_stats(ref, got) if finite and same_shape else {}
                within = (
                    finite
                    and same_shape
                    and bool(np.all(np.abs(got - ref) <= tol["atol"] + tol["rtol"] * np.abs(ref)))
                )
                held = within if judged is None or name in judged else finite and same_shape
                ok &= held
                prev = worst.setdefault(
                    name, {"finite": True, "within_tolerance": True, "passed": True}
                )
                prev["finite"] &= finite
                prev["within_tolerance"] &= within
                prev["passed"] &= held
                for k, v in stats.items():
                    prev[k] = max(prev.get(k, 0.0), v)
        report["runtimes"][rt.name] = {"passed": ok, "outputs": worst}
        report["passed"] &= ok
        del rt
        give_back()  # the session's heap, before the next one opens
    return report


def describe_failure(report: dict) -> str:
    """The failing runtimes and outputs with their worst errors, for a StageError message."""
    parts = []
    for name, r in report["runtimes"].items():
        for out, s in r["outputs"].items():
            if not s["passed"]:
                if not s["finite"]:
                    what = "NaN/Inf in output"
                elif "max_abs" not in s:
                    what = "output shape differs from the reference"
                else:
                    what = f"max abs err {s['max_abs']:.3g}, max rel err {s['max_rel']:.3g}"
                parts.append(f"{name} output {out!r}: {what}")
    tol = report["tolerance"]
    return (
        "; ".join(parts)
        + f" (tolerance {report['precision']}: atol {tol['atol']}, rtol {tol['rtol']})"
    )


def plan_feeds(
    plan, inputs: dict, batches: list[int], seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Parity feeds for a graph with ``inputs`` that runs ``plan``: per batch size, Gaussian
    samples at the plan's timesteps (cycled) and labels 0..K-1 cycled, or the fused sampler's
    noise inputs."""
    from accel.runtime import fused_feeds, step_feeds

    rng = np.random.default_rng(seed)
    from accel.runtime.loop import plan_timesteps

    timesteps, ends = plan_timesteps(plan)
    feeds = []
    for b in batches:
        labels = np.arange(b, dtype=np.int64) % (plan.num_classes or 1)
        labels = labels if "class_labels" in inputs else None
        if plan.conditioning_kind == "text":  # Gaussian stand-ins of the encoders' outputs
            labels = {}
            for name, spec in plan.conditioning.items():
                shape = _fixed(inputs[name][0], b if plan.is_batched(name) else None)
                if spec.get("dtype", "float32").startswith("int"):  # masks: every token on
                    labels[name] = np.ones(shape, np.dtype(spec["dtype"]))
                else:
                    labels[name] = rng.standard_normal(shape).astype(np.float32)
        x = rng.standard_normal((b, *plan.sample_shape)).astype(np.float32)
        if plan.fused:
            feeds.append(fused_feeds(plan, x, labels, rng))
        else:
            null = {k: v[:1] for k, v in labels.items()} if isinstance(labels, dict) else None
            feeds.append(step_feeds(plan, x, timesteps, labels, null, ends))
    return feeds


def _fixed(shape: list, batch: int | None) -> list[int]:
    """A graph input's shape with its symbolic batch axis set to ``batch`` (None: an input shared
    by the batch, its own shape)."""
    if batch is None:
        return [d if isinstance(d, int) else 1 for d in shape]
    return [batch, *(d if isinstance(d, int) else 1 for d in shape[1:])]
