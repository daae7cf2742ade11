"""Peak memory of the quality gate against its sample count and draw batch: the digits UNet's
config at 64 x 64 pixels (random weights), a 2-step ONNX graph gated against itself (image
RMSE) in a fresh process per run, peak RSS from getrusage. One batch of all the samples is what
the gate did before it drew in the target's batch.

    python benchmarks/gate_memory.py [--runs 16:4 256:4 256:256] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

GATE = """
import json, resource, sys
from pathlib import Path
from accel.core.plan import SamplerPlan
from accel.runtime import OrtRuntime
from export.quality_gate import GateConfig, quality_gate
graph, samples, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
plan = SamplerPlan.load(graph / "sampler_plan.json")
side = (OrtRuntime(graph / "model.onnx"), plan)
gate = GateConfig(metric="image_rmse", threshold=1e-3, samples=samples)
quality_gate("bench", gate, side, side, lambda m: None, batch=batch)
print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build_graph(root: Path) -> Path:
    """The digits UNet's config (tests/tiny.py's) at 64 px, exported to ONNX for 2 steps."""
    import torch
    from diffusers import UNet2DModel

    from accel.core.model_info import ModelInfo
    from accel.core.target import load_target
    from accel.pipeline import default_store, run_or_reuse
    from accel.registry import get_stage
    from distill.checkpoint import save_pipeline

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=64, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
        num_class_embeds=11,
    ).eval()  # fmt: skip
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000,
                 "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
                 "clip_sample": False, "timestep_spacing": "trailing"}  # fmt: skip
    save_pipeline(root / "teacher", unet, scheduler, ModelInfo(null_class_label=10, num_classes=10))
    store = default_store(root / "store")
    stage = get_stage("onnx")
    graph = run_or_reuse(
        stage, stage.config(num_inference_steps=2), store.source(root / "teacher"),
        load_target("cpu"), store, lambda m: None,
    )  # fmt: skip
    return graph.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["16:4", "256:4", "256:256"],
                   help="samples:batch per run")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gate_memory.json"))
    args = p.parse_args()
    from accel.core.hardware import environment

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        graph = build_graph(Path(tmp))
        for run in args.runs:
            samples, batch = map(int, run.split(":"))
            out = subprocess.run(
                [sys.executable, "-c", GATE, str(graph), str(samples), str(batch)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
            rows.append({"samples": samples, "batch": batch, "peak_mib": round(peak, 1)})
            print(f"samples {samples:4d}, batch {batch:4d}: peak {peak:8.1f} MiB", flush=True)
    result = {"runs": rows, "machine": platform.processor() or platform.machine(),
              "environment": environment()}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
