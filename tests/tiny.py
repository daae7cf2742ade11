"""Tiny diffusers models built from configs, for fast tests."""

from diffusers import UNet2DModel

from accel.core.model_info import ModelInfo
from distill.checkpoint import save_pipeline


def tiny_unet(seed: int = 0, num_class_embeds: int | None = 11) -> UNet2DModel:
    import torch

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds,
    ).eval()


SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "timestep_spacing": "trailing",
}


def write_tiny_pipeline(path, seed=0, **info):
    save_pipeline(
        path,
        tiny_unet(seed),
        SCHEDULER,
        ModelInfo(**{"null_class_label": 10, "num_classes": 10, **info}),
    )
    return path


def build(store, parent, stage_name, target="cpu", **config):
    """Run one stage on ``parent`` into ``store`` (or take it from the cache); its artifact."""
    from accel.core.target import load_target
    from accel.pipeline import run_or_reuse
    from accel.registry import get_stage

    stage = get_stage(stage_name)
    return run_or_reuse(
        stage, stage.config(**config), parent, load_target(target), store, lambda m: None
    )


def gpu_target(**fields):
    """A GPU target built in memory (H100, fp16, TensorRT EP first)."""
    from accel.core.target import Target

    return Target.model_validate(
        {
            "name": "gpu",
            "description": "test",
            "device": "cuda",
            "gpu": "H100",
            "compute_capability": "9.0",
            "backends": ["ort", "tensorrt"],
            "providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
            "precision": "fp16",
            "shapes": {
                "batch": {"min": 1, "opt": 8, "max": 32},
                "resolution": {"min": 16, "opt": 16, "max": 16},
            },
            **fields,
        }
    )


def run_cli(monkeypatch, capsys, *args):
    """`accel ARGS` in this process: (exit code, stdout, stderr)."""
    import sys

    from accel.cli import main

    monkeypatch.setattr(sys, "argv", ["accel", *map(str, args)])
    capsys.readouterr()  # only the command's output (not a fixture's progress bars before it)
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err
