"""Every stage at the size users hold: SD1.5-, SDXL- and SD3-medium-size pipelines built offline
from their real configs with random weights (UNet 859.5 M / 2.57 B, SD3's MMDiT 2.03 B; CLIP
ViT-L 123 M, OpenCLIP bigG 695 M; the SD and SDXL VAE 83.7 M, SD3's 16-channel VAE), each stage
run as the command a user types, with tiny counts (2 iterations, batch 1, one image).

    python benchmarks/real_size.py --model sd15 [--stages distill export quantize compile bundle
        sample profile] [--work DIR] [--out benchmarks/results/real_size_sd15.json]
        [--dtype fp32|fp16] [--full-weight] [--tiny]

Each command is a child process; its peak resident memory is the kernel's high-water mark of
that child (``os.wait4``'s ``ru_maxrss``, which covers the processes it waited for), its wall
time the child's. The stage's own manifest figures (``peak_rss_mb``: the stage alone, after
imports and loading) are read back beside it. The weights are random, so quality figures are not
the point; the INT8 gate's threshold is opened (``--int8-threshold``) for that reason, and the
compile gate keeps its defaults (image RMSE, at most ``max_seconds`` of drawing).

The pipeline is written once per model into ``--work`` (``pipeline-<model>``, fp32 or, with
``--dtype fp16``, fp16 safetensors as the Hub's ``fp16`` variants hold them) with an imagefolder
of four captioned images at its resolution. ``--tiny`` runs the same code on tiny configs (a
smoke test of the script; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check import SD3_MEDIUM, SDXL_UNET  # noqa: E402
from sd_components import SD15_UNET, SD_VAE  # noqa: E402

PROMPTS = ["a handwritten seven", "a red circle on a white table", "a photo of a cat", "a house"]
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, projection_dim=1280, hidden_act="gelu")  # fmt: skip
SD3_VAE = {**SD_VAE, "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609,
           "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024}  # fmt: skip
DDPM = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "steps_offset": 1}  # fmt: skip
RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd3": 1024}


def tiny(config: dict, **changes) -> dict:
    return {**config, **changes}


def text_encoder(tokenizer, spec: dict, projection: bool, tiny_size: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if tiny_size:
        spec = dict(spec, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, projection_dim=32)  # fmt: skip
    config = CLIPTextConfig(
        vocab_size=49408,  # CLIP's: the embedding table at its real size (the test tokenizer
        # uses the first 514 ids)
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build(model: str, out: Path, dtype: str, tiny_size: bool) -> Path:
    """Write the ``model`` pipeline (random weights, real configs) and its imagefolder into
    ``out``; skipped when it is there."""
    import diffusers
    import torch

    from accel.assets.make_text_teacher import clip_tokenizer
    from accel.core.model_info import Evaluation, ModelInfo

    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    tok = clip_tokenizer(words=(), model_max_length=77)
    small = {"block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8}
    if model == "sd15":
        unet = diffusers.UNet2DConditionModel(**(
            tiny(SD15_UNET, **small, cross_attention_dim=32, attention_head_dim=2, sample_size=8)
            if tiny_size else SD15_UNET
        ))  # fmt: skip
        vae = diffusers.AutoencoderKL(**(tiny(SD_VAE, **small) if tiny_size else SD_VAE))
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder(tok, CLIP_L, False, tiny_size), tokenizer=tok,
            unet=unet, scheduler=diffusers.PNDMScheduler(**DDPM, skip_prk_steps=True,
                                                         set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    elif model == "sdxl":
        config = SDXL_UNET
        if tiny_size:
            config = tiny(SDXL_UNET, block_out_channels=(32, 32, 64), norm_num_groups=8, sample_size=8,
                          transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 2, 4),
                          cross_attention_dim=64, projection_class_embeddings_input_dim=80,
                          addition_time_embed_dim=8)  # fmt: skip
        vae_cfg = tiny(SD_VAE, scaling_factor=0.13025, sample_size=1024, force_upcast=True)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=diffusers.AutoencoderKL(**(tiny(vae_cfg, **small) if tiny_size else vae_cfg)),
            text_encoder=text_encoder(tok, CLIP_L, False, tiny_size),
            text_encoder_2=text_encoder(tok, CLIP_G, True, tiny_size),
            tokenizer=tok, tokenizer_2=tok, unet=diffusers.UNet2DConditionModel(**config),
            scheduler=diffusers.EulerDiscreteScheduler(**DDPM, timestep_spacing="leading"),
        )  # fmt: skip
    elif model == "sd3":
        config = SD3_MEDIUM
        if tiny_size:
            config = tiny(SD3_MEDIUM, num_layers=2, attention_head_dim=8, sample_size=8,
                          num_attention_heads=2, joint_attention_dim=32,
                          caption_projection_dim=16, pooled_projection_dim=64)  # fmt: skip
        vae = diffusers.AutoencoderKL(**(tiny(SD3_VAE, **small) if tiny_size else SD3_VAE))
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=diffusers.SD3Transformer2DModel(**config), vae=vae,
            text_encoder=text_encoder(tok, CLIP_L, True, tiny_size), tokenizer=tok,
            text_encoder_2=text_encoder(tok, CLIP_G, True, tiny_size), tokenizer_2=tok,
            text_encoder_3=None, tokenizer_3=None,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        )  # fmt: skip
    else:
        raise SystemExit(f"unknown model {model!r}: sd15, sdxl or sd3")
    if dtype == "fp16":
        pipe.to(torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    ModelInfo(evaluation=Evaluation(metric="image_rmse", prompts=PROMPTS)).write(tmp)
    os.replace(tmp, out)
    return out


def imagefolder(out: Path, size: int) -> Path:
    import numpy as np
    from PIL import Image

    if (out / "metadata.jsonl").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, prompt in enumerate(PROMPTS):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            out / f"{i}.png"
        )
        rows.append(json.dumps({"file_name": f"{i}.png", "text": prompt}))
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return out


def run(name: str, args: list, log: Path) -> dict:
    """``accel ARGS`` as a child process: exit code, wall seconds, peak RSS (MB)."""
    cmd = [sys.executable, "-m", "accel.cli", *map(str, args)]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    result = {
        "command": "accel " + shlex.join(cmd[3:]),
        "exit_code": code,
        "wall_s": round(seconds, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }
    if code != 0:
        result["error"] = log.read_text()[-600:].strip().splitlines()[-1:]
    print(f"    -> exit {code}, {seconds:.0f} s, peak {result['peak_rss_mb']:.0f} MB", flush=True)
    return result


def manifest_metrics(artifact: Path) -> dict:
    """The stage's own figures from its manifest: peak memory, LoRA size, exporters, gate."""
    file = artifact / "manifest.json"
    if not file.is_file():
        return {}
    metrics = json.loads(file.read_text()).get("metrics", {})
    keep = {f"stage_{k}": metrics[k] for k in ("peak_rss_mb", "peak_child_rss_mb") if k in metrics}
    keep.update({k: metrics[k] for k in ("wall_seconds", "lora") if k in metrics})
    if "components" in metrics:
        keep["components"] = {
            name: {
                k: c.get(k)
                for k in ("exporter", "dynamo_max_batch", "export_seconds", "onnx_bytes")
            }  # fmt: skip
            for name, c in metrics["components"].items()
        }
    gate = metrics.get("quality_gate") or metrics.get("gate")
    if isinstance(gate, dict):
        keep["gate"] = {k: gate.get(k) for k in ("metric", "drawn", "batch", "value", "passed")}
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RESOLUTION), default="sd15")
    parser.add_argument("--stages", nargs="+", default=["distill", "export", "quantize",
                        "compile", "bundle", "sample", "profile"])  # fmt: skip
    parser.add_argument("--work", type=Path, default=Path("/tmp/accel-real-size"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--full-weight", action="store_true", help="also full-weight distillation")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--int8-threshold", type=float, default=10.0)
    parser.add_argument("--gate-seconds", type=float, default=120.0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--beside",
        default="nothing else heavy",
        help="what ran on the machine beside it (recorded with each stage)",
    )
    a = parser.parse_args()

    from accel.core.hardware import environment

    work = a.work / (a.model + ("-tiny" if a.tiny else "") + ("-fp16" if a.dtype == "fp16" else ""))
    work.mkdir(parents=True, exist_ok=True)
    size = 64 if a.tiny else RESOLUTION[a.model]
    t0 = time.perf_counter()
    pipeline = build(a.model, work / "pipeline", a.dtype, a.tiny)
    build_s = time.perf_counter() - t0
    data = imagefolder(work / "images", size)
    store = work / "store"
    common = ["--store", store]
    gate = f'{{ metric = "image_rmse", max_seconds = {a.gate_seconds} }}'
    int8_gate = (
        f'{{ metric = "image_rmse", threshold = {a.int8_threshold}, '
        f"max_seconds = {a.gate_seconds} }}"
    )
    paths = {k: work / k for k in ("student", "onnx", "int8", "engine", "bundle", "report")}
    distill = ["distill", "consistency", pipeline, "--iterations", 2, "--batch-size", 1,
               "--gradient-checkpointing", "--dataset", f"imagefolder:{data}", "--solver-steps", 50,
               "--num-inference-steps", 2, "--guidance-scale", 4.0, "--checkpoint-every", 0,
               "--learning-rate", 1e-4]  # fmt: skip
    commands = {
        "distill": [*distill, "--lora-rank", a.lora_rank, "--out", paths["student"]],
        "distill_full": [*distill, "--out", work / "student-full"],
        "export": ["export", "onnx", paths["student"], "--out", paths["onnx"]],
        "quantize": ["quantize", paths["onnx"], "--method", "ort_int8", "--calibration-samples", 1,
                     "--components", '["denoiser"]', "--gate", int8_gate, "--out", paths["int8"]],
        "compile": ["compile", paths["int8"] if "quantize" in a.stages else paths["onnx"],
                    "--backend", "ort", "--gate", gate, "--out", paths["engine"]],
        "bundle": ["bundle", paths["engine"], "--out", paths["bundle"]],
        "sample": ["sample", paths["bundle"], "--prompt", PROMPTS[0], "--out", work / "sample.npz"],
        "profile": ["profile", paths["bundle"], "--iterations", 2, "--warmup-iterations", 1,
                    "--quality-samples", 0, "--target", "cpu", "--out", paths["report"]],
    }  # fmt: skip
    stages = [*(["distill_full"] if a.full_weight else []), *a.stages]
    results: dict = {}
    for name in stages:
        args = commands[name]
        if name not in ("sample", "profile"):
            args = [*args, *common]
        out = next((Path(v) for k, v in zip(args, args[1:], strict=False) if k == "--out"), None)
        if out is not None and out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        results[name] = run(name, args, work / f"{name}.log")
        results[name]["beside"] = a.beside
        if out is not None and out.is_dir():
            results[name].update(manifest_metrics(out))
        if results[name]["exit_code"] != 0:
            break
    record = {
        "model": a.model + (" (tiny configs)" if a.tiny else ""),
        "dtype": a.dtype,
        "resolution": size,
        "build_s": round(build_s, 1),
        "pipeline_bytes": sum(p.stat().st_size for p in pipeline.rglob("*") if p.is_file()),
        "stages": results,
        "environment": environment(),
    }
    name = f"real_size_{a.model}{'_tiny' if a.tiny else ''}{'_fp16' if a.dtype == 'fp16' else ''}"
    out = a.out or ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():  # stages run apart (one command each) add up in one record
        earlier = json.loads(out.read_text())
        if earlier.get("model") == record["model"] and earlier.get("dtype") == a.dtype:
            record["stages"] = {**earlier.get("stages", {}), **results}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
