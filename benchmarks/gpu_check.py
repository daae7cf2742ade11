"""The one GPU check (issue #17): everything accel's GPU engines promise, measured in one run of at
most about six minutes on one GPU, written as JSON and a Markdown table.

    python benchmarks/gpu_check.py --out $OUT            # on the GPU machine
    python benchmarks/gpu_check.py --tiny --device cpu --out /tmp/gc   # a dry run of the code here

Sections (each timed and recorded; one failing section does not stop the others):

1. ``pytest -m gpu``: the project's GPU tests.
2. digits: the shipped digits teacher's network in a 4-step fused sampler (the cost of the 4-step
   student), batch 1: eager vs CUDA graph vs torch.compile vs compiled + CUDA graph, parity of
   each against eager and interleaved latency (acceptance: CUDA graph >= 5x eager).
3. components at real size with random weights (diffusers' configs): the SD1.5 UNet at 512 px,
   batch 2 (one guided step), fp16, eager vs CUDA graph vs compiled (acceptance: compiled >= 2.5x
   eager); the SD VAE decoder at 512 px; the SDXL UNet at 1024 px and an SD3-medium transformer at
   1024 px, eager vs CUDA graph (their compiles do not fit in the six minutes).
4. SD1.5-size pipeline: CLIP-L text encoding, 4 guided UNet steps and the VAE decode end to end
   with the compiled components, against the sum of the components' own medians (acceptance:
   within 1.2x).
5. training: consistency distillation of the digits teacher, iterations per second with the
   trainer reading losses back every step (before) and every ``LOG_EVERY`` steps (after).

The GPU machine has torch with CUDA but not this project's other dependencies. Carry their
wheels (about 9 MB), downloaded here:

    pip download --only-binary=:all: --python-version 3.12 \\
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --no-deps -d wheels \\
        diffusers pydantic pydantic_core annotated-types typing-inspection importlib_metadata \\
        onnxslim safetensors

and install them there before the check: ``pip install --no-deps wheels/*.whl``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accel.runtime.loop import ShapeBuckets  # noqa: E402
from export.torch_engines import (  # noqa: E402
    BucketedEngine,
    CompiledEngine,
    CudaGraphEngine,
)

SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
}


def tiny_config(config: dict, **small) -> dict:
    return {**config, **small}


class Call(torch.nn.Module):
    """A diffusers model as ``forward(**named tensors) -> tensor`` (the engines' interface)."""

    def __init__(self, model, kind: str) -> None:
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, **kw):
        if self.kind == "unet":
            return self.model(kw["sample"], kw["timestep"], kw["encoder_hidden_states"]).sample
        if self.kind == "sdxl":
            added = {"text_embeds": kw["text_embeds"], "time_ids": kw["time_ids"]}
            return self.model(
                kw["sample"], kw["timestep"], kw["encoder_hidden_states"],
                added_cond_kwargs=added,
            ).sample  # fmt: skip
        if self.kind == "sd3":
            return self.model(
                hidden_states=kw["sample"], timestep=kw["timestep"],
                encoder_hidden_states=kw["encoder_hidden_states"],
                pooled_projections=kw["pooled"],
            ).sample  # fmt: skip
        if self.kind == "vae":
            return self.model.decode(kw["latents"] / 0.18215).sample
        if self.kind == "clip":
            return self.model(kw["input_ids"]).last_hidden_state
        raise ValueError(self.kind)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(workloads: dict, warmup: int, rounds: int, device: str) -> dict:
    """One call of each workload per round (drift hits all alike); medians in ms."""
    for fn in workloads.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in workloads}
    for _ in range(rounds):
        for name, fn in workloads.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        k: {"p50_ms": statistics.median(v), "min_ms": min(v), "n": len(v)} for k, v in times.items()
    }


def engines(module, names, feeds, device, precision, compile_: bool, graphs: bool, half: bool):
    """name -> engine (infer on numpy feeds), built and warmed at the feeds' batch."""
    b = len(next(iter(feeds.values())))
    buckets = ShapeBuckets(b, b, b)
    out: dict = {"eager": BucketedEngine(module, names, buckets, device, precision,
                                         half_weights=half)}  # fmt: skip
    if graphs and device == "cuda":
        out["cuda graph"] = CudaGraphEngine(module, names, buckets, device, precision,
                                            half_weights=half)  # fmt: skip
    if compile_:
        compiled = CompiledEngine(module, names, buckets, device, precision, half_weights=half)
        out["compiled"] = compiled
        if graphs and device == "cuda":
            out["compiled + cuda graph"] = CudaGraphEngine(compiled, names, buckets, device)
    build = {}
    for name, engine in out.items():
        t0 = time.perf_counter()
        engine.infer(feeds)
        sync(device)
        build[name] = time.perf_counter() - t0
    return out, build


def compare(out: dict, feeds: dict, device: str, warmup: int, rounds: int) -> dict:
    ref = out["eager"].infer(feeds)["images"]
    scale = float(np.abs(ref).max()) or 1.0
    parity = {
        name: float(np.abs(e.infer(feeds)["images"] - ref).max() / scale)
        for name, e in out.items()
        if name != "eager"
    }
    lat = interleaved(
        {n: (lambda e=e: e.infer(feeds)) for n, e in out.items()}, warmup, rounds, device
    )
    base = lat["eager"]["p50_ms"]
    for v in lat.values():
        v["speedup_vs_eager"] = base / v["p50_ms"]
    return {"parity_rel_max": parity, "latency": lat}


def check_pytest(args) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=args.pytest_timeout,
    )  # fmt: skip
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
    return {"returncode": proc.returncode, "summary": tail, "seconds": time.perf_counter() - t0}


def check_digits(args) -> dict:
    from accel.demo.digits import TEACHER_DIR
    from distill.checkpoint import load_denoiser
    from distill.graph import DenoiserGraph
    from distill.samplers import sampler_plan
    from export.fused_sampler import FusedSampler, example_feeds

    den, info = load_denoiser(TEACHER_DIR)
    plan = sampler_plan(den, 4, info)
    from dataclasses import replace

    plan = replace(plan, fused=True, graph_output="images")
    sampler = FusedSampler(DenoiserGraph.of(den), plan).eval()
    feeds = example_feeds(sampler, 1)
    out, build = engines(sampler, sampler.input_names(), feeds, args.device, "fp32", True, True,
                         False)  # fmt: skip
    return {
        "batch": 1,
        "steps": 4,
        "build_s": build,
        **compare(out, feeds, args.device, 20, args.rounds),
    }


def component(kind: str, args):
    """(module, input names, numpy feeds, precision) of one real-size component."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
    from sd_components import SD15_UNET, SD_VAE, TINY_UNET, TINY_VAE

    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    tiny = args.tiny
    torch.manual_seed(0)
    if kind == "sd15_unet":
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        h = 8 if tiny else 64
        d = unet.config.cross_attention_dim
        feeds = {"sample": f32(2, 4, h, h), "timestep": np.array([500, 500], np.int64),
                 "encoder_hidden_states": f32(2, 77, d)}  # fmt: skip
        return Call(unet, "unet"), feeds
    if kind == "sd_vae":
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE))
        h = 8 if tiny else 64
        return Call(vae, "vae"), {"latents": f32(1, 4, h, h)}
    if kind == "sdxl_unet":
        cfg = SDXL_UNET
        if tiny:
            cfg = tiny_config(cfg, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
                              attention_head_dim=(2, 4, 4), cross_attention_dim=32,
                              projection_class_embeddings_input_dim=32 + 6 * 256)  # fmt: skip
        unet = UNet2DConditionModel(**cfg)
        h = 8 if tiny else 128
        d = unet.config.cross_attention_dim
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * 256
        feeds = {"sample": f32(2, 4, h, h), "timestep": np.array([500, 500], np.int64),
                 "encoder_hidden_states": f32(2, 77, d), "text_embeds": f32(2, pooled),
                 "time_ids": np.tile(np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32),
                                     (2, 1))}  # fmt: skip
        return Call(unet, "sdxl"), feeds
    if kind == "sd3_medium":
        cfg = SD3_MEDIUM
        if tiny:
            cfg = tiny_config(cfg, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                              joint_attention_dim=32, caption_projection_dim=16,
                              pooled_projection_dim=32, sample_size=16, pos_embed_max_size=16)  # fmt: skip
        model = SD3Transformer2DModel(**cfg)
        h = 8 if tiny else 128
        feeds = {"sample": f32(2, 16, h, h), "timestep": np.array([500.0, 500.0], np.float32),
                 "encoder_hidden_states": f32(2, 154, model.config.joint_attention_dim),
                 "pooled": f32(2, model.config.pooled_projection_dim)}  # fmt: skip
        return Call(model, "sd3"), feeds
    raise ValueError(kind)


def check_component(kind: str, compile_: bool, args) -> dict:
    module, feeds = component(kind, args)
    precision = "fp16" if args.device == "cuda" else "fp32"
    out, build = engines(module, list(feeds), feeds, args.device, precision, compile_, True, True)
    result = {"precision": precision, "batch": len(next(iter(feeds.values()))), "build_s": build,
              **compare(out, feeds, args.device, 3, args.rounds)}  # fmt: skip
    del out, module
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def check_pipeline(args) -> dict:
    """CLIP-L encode (prompt + empty prompt), 4 guided UNet steps (batch 2) and the VAE decode,
    with the compiled UNet and VAE (text encoder eager: 4.5 ms, once per prompt), against the sum
    of each component's median alone."""
    from transformers import CLIPTextConfig, CLIPTextModel

    precision = "fp16" if args.device == "cuda" else "fp32"
    unet, unet_feeds = component("sd15_unet", args)
    vae, vae_feeds = component("sd_vae", args)
    clip_cfg = CLIP_L if not args.tiny else {**CLIP_L, "hidden_size": 32, "intermediate_size": 64,
                                               "num_hidden_layers": 2, "num_attention_heads": 2}  # fmt: skip
    torch.manual_seed(0)
    clip = Call(CLIPTextModel(CLIPTextConfig(**clip_cfg)), "clip")
    ids = {"input_ids": np.random.default_rng(0).integers(0, 49408, (2, 77)).astype(np.int64)}
    one = ShapeBuckets(2, 2, 2)
    text = BucketedEngine(clip, ["input_ids"], one, args.device, precision, half_weights=True)
    denoise = CompiledEngine(unet, list(unet_feeds), one, args.device, precision, half_weights=True)
    decode = CompiledEngine(vae, ["latents"], ShapeBuckets(1, 1, 1), args.device, precision,
                            half_weights=True)  # fmt: skip
    if args.device == "cuda":
        denoise = CudaGraphEngine(denoise, list(unet_feeds), one, args.device)
        decode = CudaGraphEngine(decode, ["latents"], ShapeBuckets(1, 1, 1), args.device)
    d_unet = unet.model.config.cross_attention_dim
    ts = [999, 749, 499, 249]

    def pipeline():
        emb = text.infer(ids)["images"]
        if emb.shape[-1] != d_unet:  # tiny configs: the text width differs from the UNet's
            emb = np.resize(emb, (2, 77, d_unet)).astype(np.float32)
        x = unet_feeds["sample"][:1]
        for t in ts:
            feeds = {"sample": np.concatenate([x, x]), "timestep": np.array([t, t], np.int64),
                     "encoder_hidden_states": emb}  # fmt: skip
            x0 = denoise.infer(feeds)["images"]
            x = (x0[1:] + 7.5 * (x0[:1] - x0[1:])).astype(np.float32) * 0.5
        return decode.infer({"latents": x})["images"]

    pipeline()  # compiles both at their shapes
    lat = interleaved(
        {
            "pipeline": pipeline,
            "text encoder": lambda: text.infer(ids),
            "unet step": lambda: denoise.infer(unet_feeds),
            "vae decode": lambda: decode.infer(vae_feeds),
        },
        3, args.rounds, args.device,
    )  # fmt: skip
    parts = (
        lat["text encoder"]["p50_ms"] + 4 * lat["unet step"]["p50_ms"] + lat["vae decode"]["p50_ms"]
    )
    return {"latency": lat, "sum_of_components_ms": parts,
            "pipeline_over_sum": lat["pipeline"]["p50_ms"] / parts}  # fmt: skip


def check_training(args) -> dict:
    """Consistency distillation of the digits teacher, iterations per second: eager with the loss
    read back every step (before #17), every LOG_EVERY steps, then also compiled (``compile``)
    and in bf16 (``mixed_precision``); the compiled run's rate excludes its first 20 (compiling)
    iterations."""
    import distill.trainer as trainer
    from accel.demo.digits import TEACHER_DIR
    from distill.checkpoint import load_denoiser
    from distill.consistency import ConsistencyConfig, distill
    from distill.data import load_dataset

    its = 20 if args.tiny else 200
    bf16 = "bf16" if args.device == "cuda" else "no"
    variants = {
        "before: eager, loss read every step": (1, {}),
        "eager, loss read every 16 steps": (trainer.LOG_EVERY, {}),
        "compiled": (trainer.LOG_EVERY, {"compile": True}),
        f"compiled, mixed precision {bf16}": (trainer.LOG_EVERY, {"compile": True, "mixed_precision": bf16}),
    }  # fmt: skip
    result = {}
    for name, (every, extra) in variants.items():
        torch._dynamo.reset()
        teacher, _ = load_denoiser(TEACHER_DIR)
        data = load_dataset("digits", teacher)
        marks: list[tuple[int, float]] = []  # (step, time) at each loss read-back
        old, trainer.LOG_EVERY = trainer.LOG_EVERY, every
        trainer.ON_READ_BACK.append(lambda step, m=marks: m.append((step, time.perf_counter())))
        try:
            t0 = time.perf_counter()
            config = ConsistencyConfig(iterations=its, checkpoint_every=0, **extra)
            distill(teacher, data, config, progress=lambda m: None)
            end = time.perf_counter()
        finally:
            trainer.LOG_EVERY = old
            trainer.ON_READ_BACK.clear()
        after = [(k, t) for k, t in marks if k >= 20]  # past the compiling steps
        steady = (
            (after[-1][0] - after[0][0]) / (after[-1][1] - after[0][1])
            if len(after) > 1
            else its / (end - t0)
        )
        result[name] = {"iterations": its, "it_per_s": steady, "wall_s": end - t0}
    return result


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['environment']['device_name']}", ""]
    lines += [
        "| check | engine | p50 ms | x eager | parity (rel. max) |",
        "|---|---|---:|---:|---:|",
    ]
    for name, r in report["checks"].items():
        if not isinstance(r, dict) or "latency" not in r or "parity_rel_max" not in r:
            continue
        for engine, lat in r["latency"].items():
            par = r["parity_rel_max"].get(engine)
            lines.append(
                f"| {name} | {engine} | {lat['p50_ms']:.3f} | {lat['speedup_vs_eager']:.2f} | "
                f"{'' if par is None else f'{par:.2e}'} |"
            )
    p = report["checks"].get("sd15_pipeline")
    if isinstance(p, dict) and "pipeline_over_sum" in p:
        lines += ["", f"SD1.5-size 4-step pipeline: {p['latency']['pipeline']['p50_ms']:.2f} ms, "
                  f"{p['pipeline_over_sum']:.2f}x the sum of its components"]  # fmt: skip
    t = report["checks"].get("training")
    if isinstance(t, dict):
        lines += [""] + [
            f"training {k}: {v['it_per_s']:.1f} it/s" for k, v in t.items() if isinstance(v, dict)
        ]
    lines += ["", "Acceptance:"] + [f"- {k}: {v}" for k, v in report["acceptance"].items()]
    return "\n".join(lines) + "\n"


def acceptance(checks: dict) -> dict:
    def get(path, default=None):
        r = checks
        for k in path:
            if not isinstance(r, dict) or k not in r:
                return default
            r = r[k]
        return r

    out = {}
    d = get(["digits", "latency", "cuda graph", "speedup_vs_eager"])
    out["digits 4-step CUDA graph >= 5x eager"] = (
        None if d is None else f"{d:.2f}x ({'met' if d >= 5 else 'NOT met'})"
    )
    u = get(["sd15_unet", "latency", "compiled", "speedup_vs_eager"])
    out["SD1.5 UNet compiled >= 2.5x eager fp16"] = (
        None if u is None else f"{u:.2f}x ({'met' if u >= 2.5 else 'NOT met'})"
    )
    p = get(["sd15_pipeline", "pipeline_over_sum"])
    out["SD1.5 pipeline within 1.2x of its components"] = (
        None if p is None else f"{p:.2f}x ({'met' if p <= 1.2 else 'NOT met'})"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs: a dry run of the code")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--skip", nargs="*", default=[])
    p.add_argument("--pytest-timeout", type=int, default=150)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    env = {
        "device_name": gpu or platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "tiny": args.tiny,
    }  # fmt: skip
    plan = [
        ("pytest_gpu", lambda: check_pytest(args)),
        ("digits", lambda: check_digits(args)),
        ("sd15_unet", lambda: check_component("sd15_unet", True, args)),
        ("sd_vae", lambda: check_component("sd_vae", True, args)),
        ("sdxl_unet", lambda: check_component("sdxl_unet", False, args)),
        ("sd3_medium", lambda: check_component("sd3_medium", False, args)),
        ("sd15_pipeline", lambda: check_pipeline(args)),
        ("training", lambda: check_training(args)),
    ]
    checks: dict = {}
    t_all = time.perf_counter()
    for name, fn in plan:
        if name in args.skip:
            continue
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - t_all:6.1f}s] {name}", flush=True)
        try:
            checks[name] = fn()
        except Exception as e:  # one failing check is a result, not the end of the run
            checks[name] = {"error": f"{type(e).__name__}: {e}"[:600],
                            "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
        if isinstance(checks[name], dict):
            checks[name]["seconds"] = time.perf_counter() - t0
        report = {"environment": env, "checks": checks, "acceptance": acceptance(checks),
                  "total_seconds": time.perf_counter() - t_all}  # fmt: skip
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "gpu_check.md").write_text(markdown(report))
    print((args.out / "gpu_check.md").read_text())


if __name__ == "__main__":
    main()
