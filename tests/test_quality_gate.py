"""The quality gate draws in batches of the target's batch, side by side: its peak memory does not
grow with its sample count."""

import json
import subprocess
import sys

import pytest

from accel.core.model_info import ModelInfo
from accel.pipeline import default_store
from distill.checkpoint import save_pipeline

from tiny import SCHEDULER, build, tiny_unet

GATE = """
import json, resource, sys
from pathlib import Path
from accel.core.plan import SamplerPlan
from accel.runtime import OrtRuntime
from export.quality_gate import GateConfig, quality_gate
graph = Path(sys.argv[1])
plan = SamplerPlan.load(graph / "sampler_plan.json")
side = (OrtRuntime(graph / "model.onnx"), plan)
gate = GateConfig(metric="image_rmse", threshold=1e-3, samples=int(sys.argv[2]))
result = quality_gate("test", gate, side, side, lambda m: None, batch=4)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mib": peak, "passed": result["passed"], "batch": result["batch"]}))
"""


@pytest.fixture(scope="module")
def graph_64px(tmp_path_factory):
    """The tiny digits UNet at 64 x 64 pixels (weights do not depend on the size): its attention
    block at 32 x 32 holds a 1024 x 1024 score matrix per image, 4 MiB, so one batch of 256
    would need 1 GiB for that tensor alone; a batch of 4 needs 16 MiB."""
    root = tmp_path_factory.mktemp("gate")
    unet = tiny_unet()
    unet.register_to_config(sample_size=64)
    save_pipeline(root / "teacher", unet, SCHEDULER, ModelInfo(null_class_label=10, num_classes=10))
    store = default_store(root / "store")
    return build(store, store.source(root / "teacher"), "onnx", num_inference_steps=2).path


def _gate(graph, samples: int) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", GATE, str(graph), str(samples)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_gates_peak_memory_does_not_grow_with_its_sample_count(graph_64px):
    small, large = _gate(graph_64px, 16), _gate(graph_64px, 256)
    assert small["passed"] and large["passed"] and large["batch"] == 4
    # 16x the samples: the same batches, so the same peak (measured on an AMD EPYC: 448.5 and
    # 448.7 MiB); drawn in one batch of 256, the gate peaked at 12,019 MiB
    assert large["peak_mib"] - small["peak_mib"] < 128, (small, large)


# ---------------------------------------------------------------- prompts come from the model


def _text_plan(**fields):
    from accel.core.plan import SamplerPlan, Step

    return SamplerPlan(
        steps=[Step(timestep=999, a=0.0, b=1.0)], sample_shape=[1, 4, 4], family="sd",
        conditioning_kind="text", **fields,
    )  # fmt: skip


@pytest.fixture
def drawn_prompts(monkeypatch):
    """The prompts every text draw samples (``accel.runtime.loop.run_pipeline`` recorded: each
    call returns mid-gray images and, on the calibration path, one step's feeds)."""
    import numpy as np

    import accel.runtime.loop as loop

    seen: list[str] = []

    def fake_run_pipeline(runtime, plan, noise, prompts, labels=None, rng=None, on_step=None):
        seen.extend(prompts)
        if on_step is not None:
            on_step({"sample": noise})
        return np.zeros_like(noise)

    monkeypatch.setattr(loop, "run_pipeline", fake_run_pipeline)
    return seen


def test_text_models_are_gated_and_calibrated_on_their_own_or_the_users_prompts(drawn_prompts):
    from accel.core.errors import StageError
    from export.quality_gate import GateConfig, quality_gate
    from export.quantize_onnx import component_calibration_feeds

    model_prompts = ["a red circle", "a blue square"]
    plan = _text_plan(evaluation_prompts=model_prompts)
    side = (None, plan)
    quality_gate("ort", GateConfig(samples=5, threshold=0.0), side, side, lambda m: None, 5)
    assert drawn_prompts == [model_prompts[i % 2] for i in range(5)] * 2  # parent, candidate
    drawn_prompts.clear()
    mine = GateConfig(samples=3, threshold=0.0, prompts=["a green cat"])
    quality_gate("ort", mine, side, side, lambda m: None, 2)
    assert set(drawn_prompts) == {"a green cat"}

    drawn_prompts.clear()
    feeds = component_calibration_feeds(None, plan, 4, seed=0, batch=4)
    assert drawn_prompts == model_prompts * 2 and len(feeds["denoiser"]) == 1
    drawn_prompts.clear()
    component_calibration_feeds(None, plan, 2, seed=0, batch=2, prompts=["a cat"])
    assert drawn_prompts == ["a cat", "a cat"]

    drawn_prompts.clear()
    bare = (None, _text_plan())  # an accel.json without evaluation prompts, and none given
    with pytest.raises(StageError) as gate_error:
        quality_gate("ort", GateConfig(samples=2), bare, bare, lambda m: None, 2)
    with pytest.raises(StageError) as calibration_error:
        component_calibration_feeds(None, bare[1], 2, seed=0)
    for error, option in ((gate_error, "gate.prompts"), (calibration_error, "calibration_prompts")):
        message = str(error.value)
        assert "\n" not in message and "names no evaluation prompts" in message
        assert f'give {option} = ["a prompt", ...]' in message
    assert not drawn_prompts  # refused before anything was drawn


def test_a_metric_the_model_names_comes_from_the_metrics_table():
    from accel.core.errors import StageError
    from accel.registry import METRICS
    from export.quality_gate import GateConfig, quality_gate

    assert {"image_rmse", "fd_digits"} <= set(METRICS)
    with pytest.raises(ValueError, match="unknown metric 'fid'"):
        GateConfig(metric="fid")
    plan = _text_plan(evaluation_prompts=["a"], metric="clip_score")
    with pytest.raises(StageError, match="names the quality metric 'clip_score'"):
        quality_gate("ort", GateConfig(samples=2), (None, plan), (None, plan), lambda m: None)


# ---------------------------------------------------------------- sized to the model


def test_a_per_image_gate_stops_at_max_seconds_and_says_how_many_it_drew(
    drawn_prompts, monkeypatch
):
    """A clock that advances 10 s per reading: a 25 s budget over two seeds gives each seed
    its half, so each stops after the batch that crossed its share; a distribution metric
    would draw everything (max_seconds applies to per-image metrics only)."""
    import itertools

    import export.quality_gate as qg

    ticks = itertools.count(0.0, 10.0)
    monkeypatch.setattr(qg.time, "perf_counter", lambda: next(ticks))
    plan = _text_plan(evaluation_prompts=["a red circle"])
    side = (None, plan)
    gate = qg.GateConfig(samples=100, seeds=[0, 1], threshold=0.0, max_seconds=25.0)
    result = qg.quality_gate("ort", gate, side, side, lambda m: None, 4)
    assert result["passed"] and result["stopped_at_max_seconds"]
    assert 0 < result["drawn"] < 200 and result["drawn"] % 4 == 0
    ticks = itertools.count(0.0, 10.0)
    unlimited = qg.GateConfig(samples=12, seeds=[0], threshold=0.0, max_seconds=None)
    result = qg.quality_gate("ort", unlimited, side, side, lambda m: None, 4)
    assert result["drawn"] == 12 and not result["stopped_at_max_seconds"]


def test_draws_take_fewer_images_per_batch_as_the_images_grow():
    from accel.core.plan import SamplerPlan, Step
    from accel.runtime.loop import bounded_batch

    def plan(shape, resolution=None):
        steps = [Step(timestep=999, a=0.0, b=1.0)]
        return SamplerPlan(steps=steps, sample_shape=shape, resolution=resolution)

    assert bounded_batch(plan([1, 16, 16]), 64) == 64  # the digits: the target's batch
    assert bounded_batch(plan([4, 16, 16], [32, 32]), 64) == 64  # the tiny text teacher's
    assert bounded_batch(plan([4, 64, 64], [512, 512]), 64) == 1  # SD1.5 at 512 px
    assert bounded_batch(plan([4, 32, 32], [256, 256]), 64) == 4
    assert bounded_batch(plan([4, 128, 128], [1024, 1024]), 64) == 1  # SDXL at 1024 px
    assert bounded_batch(plan([4096, 64], [1024, 1024]), 64) == 1  # Flux's packed tokens
    assert bounded_batch(plan([1, 16, 16]), 2) == 2  # never more than the target's
