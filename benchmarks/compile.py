"""Export passes on the demo student, all measured in one run: per-call and end-to-end latency
of torch eager fp32, onnxruntime fp32, onnxruntime INT8 (onnxruntime's quantizer, Model
Optimizer's ONNX PTQ, Model Optimizer's torch SmoothQuant), AOTInductor, and the fused sampler
against the per-step loop; FLOPs per call and the fraction of this machine's fp32 matmul peak
(measured in the same run); FD-digits of each.

    python benchmarks/compile.py [--store .accel-store] [--out benchmarks/results/compile.json]

The student is the demo recipe's progressive stage (trained on first use, about 9 minutes, then
cached in the store). Every engine is built by the same stages a recipe runs, quality gates on.
Latencies are interleaved (one call of each workload per round), so machine drift hits all alike;
ratios are taken between medians of the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from accel.cli import demo_recipe
from accel.core.artifact import Store
from accel.core.errors import StageError
from accel.core.model_info import ModelInfo
from accel.pipeline import run_or_reuse, run_recipe
from accel.recipe import load_recipe
from accel.registry import get_stage

GATE = {"metric": "fd_digits", "threshold": 0.05, "samples": 1000, "seeds": [0]}


def build(store: Store, parent, target, name: str, **config):
    stage = get_stage(name)
    return run_or_reuse(stage, stage.config(**config), parent, target, store)


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 GEMM throughput of torch.mm (n x n), the best of ``repeats``: this machine's peak."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def flops_per_call(graph, feeds: dict) -> int:
    """FLOPs of one denoiser call on ``feeds`` (torch's FlopCounterMode: matmuls and convolutions)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    args = [torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "class_labels")]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        graph(*args)
    return int(counter.get_total_flops())


def medium_unet_check(store: Store, target, iterations: int) -> dict:
    """The same passes on a medium UNet2DModel (64/128/256 channels, 32x32x4 latents, 4.4 GFLOP
    per sample, random weights): per-call latency of eager, onnxruntime fp32 and onnxruntime
    INT8 at the target's optimal batch. Latency only: with random weights FD means nothing, so
    its quality gates compare images (RMS) against a loose bound."""
    import tempfile

    import torch
    from diffusers import UNet2DModel

    from accel.profile.harness import measure_interleaved
    from accel.runtime import open_engine, step_feeds
    from distill.checkpoint import save_pipeline
    from export.onnx_export import graph_and_plan

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=11,
    ).eval()
    scheduler = {
        "_class_name": "DDIMScheduler",
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "timestep_spacing": "trailing",
    }
    gate = {"metric": "image_rmse", "threshold": 1.0, "samples": 8}
    with tempfile.TemporaryDirectory() as tmp:  # the store copies it in with the first build
        save_pipeline(tmp, unet, scheduler, ModelInfo(null_class_label=10, num_classes=10))
        source = store.source(tmp)
        graph, plan = graph_and_plan("bench", Path(tmp), 4, None)
        fp32_graph = build(store, source, target, "onnx", num_inference_steps=4)
    fp32 = build(store, fp32_graph, target, "ort", gate=gate)
    int8_graph = build(store, fp32_graph, target, "quantize", calibration_samples=16, gate=gate)
    int8 = build(store, int8_graph, target, "ort", gate=gate)
    s8_graph = build(
        store, fp32_graph, target, "quantize", calibration_samples=16, activations="int8", gate=gate
    )
    s8 = build(store, s8_graph, target, "ort", gate=gate)
    from export.torch_runtime import TorchRuntime

    runtimes = {
        "torch eager fp32": TorchRuntime(graph),
        "onnxruntime fp32": open_engine(fp32.path, target, spin=False)[0],
        "onnxruntime INT8 (onnxruntime quantizer)": open_engine(int8.path, target, spin=False)[0],
        "onnxruntime INT8 (onnxruntime quantizer, s8 activations)": open_engine(
            s8.path, target, spin=False
        )[0],
    }
    batch = target.shapes.batch.opt
    x = np.random.default_rng(0).standard_normal((batch, *plan.sample_shape)).astype(np.float32)
    feeds = step_feeds(plan, x, plan.steps[0].timestep, np.arange(batch, dtype=np.int64))
    ms = measure_interleaved(
        {name: (lambda rt=rt: rt.infer(feeds)) for name, rt in runtimes.items()},
        5,
        max(10, iterations // 4),
    )
    flops = flops_per_call(graph, feeds)
    eager = ms["torch eager fp32"]["p50"]
    return {
        "model": "UNet2DModel (64, 128, 256), 32x32x4, random weights",
        "batch": batch,
        "flops_per_call": flops,
        "rows": {
            name: {
                "per_call_ms": m,
                "speedup_vs_eager": eager / m["p50"],
                "gflops_per_s": flops / (m["p50"] / 1e3) / 1e9,
            }
            for name, m in ms.items()
        },
        "int8_over_fp32_engine": ms["onnxruntime fp32"]["p50"]
        / ms["onnxruntime INT8 (onnxruntime quantizer)"]["p50"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=Path(".accel-store"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/compile.json"))
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--iterations", type=int, default=100)
    args = p.parse_args()

    import torch

    from accel.core.hardware import environment
    from accel.demo.digits import evaluate_images, generate
    from accel.profile.harness import measure_interleaved
    from accel.runtime import open_engine, sample, step_feeds
    from export.onnx_export import graph_and_plan
    from export.torch_runtime import TorchRuntime

    store = Store(args.store)
    recipe = load_recipe(demo_recipe("digits-pixel"))
    target = recipe.target
    recipe = dataclasses.replace(recipe, stages=recipe.stages[:1])  # progressive only
    (student,) = run_recipe(recipe, store)
    t0 = time.perf_counter()
    builds: dict[str, dict] = {}

    def timed(label: str, fn):
        start = time.perf_counter()
        try:
            artifact = fn()
        except StageError as e:
            builds[label] = {"error": str(e), "seconds": time.perf_counter() - start}
            print(f"{label}: {e}", flush=True)
            return None
        builds[label] = {"seconds": time.perf_counter() - start, "metrics": artifact.metrics}
        return artifact

    fp32 = timed("onnx fp32", lambda: build(store, student, target, "onnx"))
    fused = timed("onnx fused", lambda: build(store, student, target, "onnx", fused_sampler=True))
    engines = {
        "onnxruntime fp32": timed("ort fp32", lambda: build(store, fp32, target, "ort", gate=GATE)),
        "fused sampler (onnxruntime fp32)": timed(
            "ort fused", lambda: build(store, fused, target, "ort", gate=GATE)
        ),
    }
    for label, make in {
        "onnxruntime INT8 (onnxruntime quantizer)": lambda: build(
            store, fp32, target, "quantize", method="ort_int8", gate=GATE
        ),
        "onnxruntime INT8 (onnxruntime quantizer, s8 activations)": lambda: build(
            store, fp32, target, "quantize", method="ort_int8", activations="int8", gate=GATE
        ),
        "onnxruntime INT8 (modelopt ONNX PTQ, entropy)": lambda: build(
            store, fp32, target, "quantize", method="modelopt_int8", gate=GATE
        ),
        "onnxruntime INT8 (modelopt ONNX PTQ, minmax)": lambda: build(
            store,
            fp32,
            target,
            "quantize",
            method="modelopt_int8",
            calibration_method="minmax",
            gate=GATE,
        ),
        "onnxruntime INT8 (modelopt torch SmoothQuant)": lambda: build(
            store, student, target, "quantize_torch", method="int8_smoothquant", gate=GATE
        ),
    }.items():
        quantized = timed(label + ": quantize", make)
        engines[label] = quantized and timed(
            label + ": compile", lambda q=quantized: build(store, q, target, "ort", gate=GATE)
        )
    engines["AOTInductor"] = timed("aoti", lambda: build(store, student, target, "aoti", gate=GATE))
    build_s = time.perf_counter() - t0

    graph, plan = graph_and_plan("bench", student.path, None, None)
    runtimes: dict[str, tuple] = {"torch eager fp32": (TorchRuntime(graph), plan)}
    for label, artifact in engines.items():
        if artifact is not None:
            runtimes[label] = open_engine(artifact.path, target, spin=False)
    batch = target.shapes.batch.opt
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((batch, *plan.sample_shape)).astype(np.float32)
    labels = np.arange(batch, dtype=np.int64) % 10
    feeds = step_feeds(plan, noise, plan.steps[0].timestep, labels)

    per_call = {
        name: (lambda rt=rt: rt.infer(feeds)) for name, (rt, p_) in runtimes.items() if not p_.fused
    }
    end_to_end = {
        name: (lambda rt=rt, p_=p_: sample(rt, p_, noise, labels))
        for name, (rt, p_) in runtimes.items()
    }
    peak_before = matmul_gflops()
    print(f"per-call latency, batch {batch}, {args.iterations} interleaved rounds", flush=True)
    call_ms = measure_interleaved(per_call, 10, args.iterations)
    print("end-to-end latency (4 steps, noise -> image)", flush=True)
    e2e_ms = measure_interleaved(end_to_end, 3, max(20, args.iterations // 4))
    print("throughput against batch size", flush=True)
    per_call_runtimes = {n: rt for n, (rt, p_) in runtimes.items() if not p_.fused}
    by_batch = {}
    for b in sorted({1, batch, 16, 48}):  # 48: inside every engine's range (AOTI's ends at 63)
        x = np.random.default_rng(b).standard_normal((b, *plan.sample_shape)).astype(np.float32)
        f = step_feeds(plan, x, plan.steps[0].timestep, np.arange(b, dtype=np.int64) % 10)
        ms = measure_interleaved(
            {name: (lambda rt=rt, f=f: rt.infer(f)) for name, rt in per_call_runtimes.items()},
            3,
            max(10, args.iterations // 5),
        )
        fl = flops_per_call(graph, f)
        by_batch[b] = {
            name: {"p50_ms": m["p50"], "gflops_per_s": fl / (m["p50"] / 1e3) / 1e9}
            for name, m in ms.items()
        }
        by_batch[b]["flops"] = fl
    print("the same passes on a medium UNet (latency only)", flush=True)
    medium = medium_unet_check(store, target, args.iterations)
    peak_after = matmul_gflops()
    peak = max(peak_before, peak_after)
    flops = flops_per_call(graph, feeds)

    quality = {}
    for name, (rt, p_) in runtimes.items():
        per_seed = []
        for seed in args.seeds:
            images, lab = generate(rt, p_, args.samples, seed, p_.num_classes)
            per_seed.append(evaluate_images(images, lab))
        quality[name] = {
            "fd_digits": float(np.mean([s["fd_digits"] for s in per_seed])),
            "class_accuracy": float(np.mean([s["class_accuracy"] for s in per_seed])),
        }
        print(f"{name}: FD-digits {quality[name]['fd_digits']:.3f}", flush=True)

    eager_call = call_ms["torch eager fp32"]["p50"]
    fp32_fd = quality["onnxruntime fp32"]["fd_digits"]
    rows = {}
    for name in runtimes:
        row = {"end_to_end_ms": e2e_ms[name], **quality[name]}
        row["fd_vs_fp32_engine"] = quality[name]["fd_digits"] / fp32_fd - 1
        if name in call_ms:
            p50 = call_ms[name]["p50"]
            row.update(
                per_call_ms=call_ms[name],
                speedup_vs_eager=eager_call / p50,
                gflops_per_s=flops / (p50 / 1e3) / 1e9,
                fraction_of_matmul_peak=flops / (p50 / 1e3) / 1e9 / peak,
            )
        rows[name] = row
    loop = e2e_ms["onnxruntime fp32"]["p50"]
    fused_row = rows.get("fused sampler (onnxruntime fp32)")
    targets = {
        "fp32 engine >= 1.5x eager per call": rows["onnxruntime fp32"]["speedup_vs_eager"],
        "fp32 engine >= 80% of matmul peak": rows["onnxruntime fp32"]["fraction_of_matmul_peak"],
        "fused sampler >= 1.1x the per-step loop": (
            loop / fused_row["end_to_end_ms"]["p50"] if fused_row else None
        ),
    }
    for name, row in rows.items():
        if "INT8" in name:
            targets[f"{name} >= 2.5x eager"] = row["speedup_vs_eager"]
            targets[f"{name}: FD within 5% of fp32"] = row["fd_vs_fp32_engine"]
    result = {
        "command": "python benchmarks/compile.py",
        "environment": environment(torch.get_num_threads()),
        "target": target.name,
        "batch": batch,
        "steps": len(plan.steps),
        "flops_per_call": flops,
        "matmul_peak_gflops": {"before": peak_before, "after": peak_after},
        "samples": args.samples,
        "seeds": args.seeds,
        "build_seconds": build_s,
        "throughput_by_batch": by_batch,
        "medium_unet": medium,
        "builds": builds,
        "rows": rows,
        "targets": targets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(targets, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
