"""Real-size Stable Diffusion 1.5 components on this CPU: the UNet (SD1.5's config, random
weights) at 512 px and the SD VAE decoder (latents 64x64 -> 512x512), per call at batch 1,
torch eager fp32 vs onnxruntime fp32 vs onnxruntime static INT8 vs AOTInductor, interleaved in one
run (one call of each engine per round, so drift hits all alike; ratios between medians).

    python benchmarks/sd_components.py [--resolution 512] [--rounds 5] [--components unet vae]
        [--skip aoti] [--out benchmarks/results/sd_components.json] [--tiny]

The graphs are made by accel's own exporter (``export.onnx_export.onnx_from_torch``: the UNet's
3.4 GB of weights go to external data) and engines by the onnxruntime compile stage's function
(``engine_from_onnx``); INT8 is onnxruntime's static Q/DQ on Conv/MatMul/Gemm, calibrated on
``--calibration`` random feeds (4; onnxruntime's calibrator holds every activation of all of them,
so the SD UNet takes 1 in 24 GB). The weights are random too: the figure is speed, not quality.
``--tiny`` runs the same code on tiny configs (a smoke test).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}  # fmt: skip
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
TINY_UNET = {**SD15_UNET, "block_out_channels": (32, 32, 64, 64), "cross_attention_dim": 32,
             "attention_head_dim": 2, "norm_num_groups": 8}  # fmt: skip
TINY_VAE = {**SD_VAE, "block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4}


class UNetCall(torch.nn.Module):
    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


class VaeDecode(torch.nn.Module):
    def __init__(self, vae) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample


def component(name: str, resolution: int, tiny: bool):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    h = resolution // 8
    if name == "unet":
        module = UNetCall(UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)))
        feeds = {
            "sample": np.random.default_rng(0).standard_normal((1, 4, h, h)).astype(np.float32),
            "timestep": np.array([500], np.int64),
            "encoder_hidden_states": np.random.default_rng(1)
            .standard_normal((1, 77, 32 if tiny else 768))
            .astype(np.float32),
        }
    else:
        module = VaeDecode(AutoencoderKL(**(TINY_VAE if tiny else SD_VAE)))
        feeds = {
            "latents": np.random.default_rng(0).standard_normal((1, 4, h, h)).astype(np.float32)
        }
    return module.eval(), feeds


def build_engines(
    name: str, module, feeds: dict, tmp: Path, skip: list[str], calibration: int = 4
) -> dict:
    """name -> (callable on feeds, build seconds)."""
    from accel.runtime import OrtRuntime
    from export.onnx_export import onnx_from_torch
    from export.ort_compile import engine_from_onnx
    from export.quantize_onnx import quantize_ort_int8

    args = {k: torch.from_numpy(v) for k, v in feeds.items()}
    engines: dict = {}

    def eager(f):
        with torch.inference_mode():
            return module(**{k: torch.from_numpy(v) for k, v in f.items()}).numpy()

    engines["torch eager fp32"] = (eager, 0.0)
    print(f"  {name}: ONNX export (TorchScript exporter)", flush=True)
    t0 = time.perf_counter()
    graph = tmp / f"{name}.onnx"
    onnx_from_torch(module, graph, inputs=feeds, output="out", dynamo=False)
    export_s = time.perf_counter() - t0
    # INT8 first: its calibration holds every activation of a feed, and no other engine is
    # loaded yet (the SD UNet's would not fit in 24 GB beside the fp32 session)
    if "int8" not in skip:
        print(f"  {name}: onnxruntime static INT8 (calibration, then the engine)", flush=True)
        t0 = time.perf_counter()
        rng = np.random.default_rng(2)
        calib = [{k: (rng.standard_normal(v.shape).astype(v.dtype) if v.dtype == np.float32 else v)
                  for k, v in feeds.items()} for _ in range(calibration)]  # fmt: skip
        quantize_ort_int8(graph, tmp / f"{name}-int8.onnx", calib, ["Conv", "MatMul", "Gemm"], None)
        engine_from_onnx(tmp / f"{name}-int8.onnx", tmp / f"{name}-int8-ort.onnx",
                         "CPUExecutionProvider", "all", None)  # fmt: skip
        int8 = OrtRuntime(tmp / f"{name}-int8-ort.onnx")
        engines["onnxruntime int8"] = (
            lambda f: int8.infer(f)["out"],
            export_s + time.perf_counter() - t0,
        )
    if "ort" not in skip:
        t0 = time.perf_counter()
        engine_from_onnx(graph, tmp / f"{name}-ort.onnx", "CPUExecutionProvider", "all", None)
        ort = OrtRuntime(tmp / f"{name}-ort.onnx")
        engines["onnxruntime fp32"] = (
            lambda f: ort.infer(f)["out"],
            export_s + time.perf_counter() - t0,
        )
    if "aoti" not in skip:
        print(f"  {name}: torch.export and AOTInductor compile", flush=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            program = torch.export.export(module, args=(), kwargs=args)
        package = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp / f"{name}.pt2")
        )
        aoti = torch._inductor.aoti_load_package(package)

        def run_aoti(f):
            with torch.inference_mode():
                return aoti(**{k: torch.from_numpy(v) for k, v in f.items()}).numpy()

        engines["AOTInductor"] = (run_aoti, time.perf_counter() - t0)
    return engines


def measure(engines: dict, feeds: dict, rounds: int) -> dict:
    reference = engines["torch eager fp32"][0](feeds)
    times: dict[str, list[float]] = {k: [] for k in engines}
    errors = {}
    for name, (fn, _) in engines.items():  # warm-up, and the agreement with eager
        out = fn(feeds)
        errors[name] = float(np.abs(out - reference).max())
    for _ in range(rounds):
        for name, (fn, _) in engines.items():
            t0 = time.perf_counter()
            fn(feeds)
            times[name].append(time.perf_counter() - t0)
    eager = statistics.median(times["torch eager fp32"])
    return {
        name: {
            "median_ms": 1000 * statistics.median(t),
            "min_ms": 1000 * min(t),
            "calls": len(t),
            "speedup_vs_eager": eager / statistics.median(t),
            "max_abs_diff_vs_eager": errors[name],
            "build_seconds": engines[name][1],
        }
        for name, t in times.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--components", nargs="+", default=["unet", "vae"], choices=["unet", "vae"])
    p.add_argument("--skip", nargs="*", default=[], choices=["ort", "int8", "aoti"])
    p.add_argument(
        "--calibration", type=int, default=4,
        help="random INT8 calibration feeds (onnxruntime holds every activation of all of them: "
        "1 for the SD UNet in 24 GB)",
    )  # fmt: skip
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/sd_components.json"))
    args = p.parse_args()
    from accel.core.hardware import cpu_info

    results = {}
    for name in args.components:
        module, feeds = component(name, args.resolution, args.tiny)
        params = sum(p.numel() for p in module.parameters())
        print(f"{name}: {params / 1e6:.1f}M parameters; building engines", flush=True)
        with tempfile.TemporaryDirectory(prefix="accel-sd-bench-") as tmp:
            engines = build_engines(name, module, feeds, Path(tmp), args.skip, args.calibration)
            results[name] = {"parameters": params, "engines": measure(engines, feeds, args.rounds)}
        for engine, r in results[name]["engines"].items():
            print(f"  {engine}: {r['median_ms']:.0f} ms ({r['speedup_vs_eager']:.2f}x eager, "
                  f"max diff {r['max_abs_diff_vs_eager']:.1e}, built in {r['build_seconds']:.0f} s)",
                  flush=True)  # fmt: skip
        del module, engines
        gc.collect()
    cpu = cpu_info()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python benchmarks/sd_components.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "tiny") and v != []
        ) + (" --tiny" if args.tiny else ""),
        "resolution": args.resolution, "batch": 1, "tiny": args.tiny,
        "machine": {"cpu": cpu.get("model"), "flags": sorted(set(cpu.get("flags", [])) & {
            "avx2", "avx512f", "avx512_vnni", "amx_tile", "fma"}), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__},
        "results": results,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
