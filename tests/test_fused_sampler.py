"""The fused sampler: the whole few-step loop as one graph reproduces the per-step loop, with
guidance's doubled batch inside, and with a consistency student's fresh noise fed as an input."""

import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

from accel.demo.digits import generate
from accel.pipeline import default_store
from accel.runtime import OrtRuntime, open_engine

from tiny import build, write_tiny_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    store = default_store(root / "store")
    return store, store.source(write_tiny_pipeline(root / "teacher"))


@pytest.mark.slow  # unrolled-loop exports, about a minute each
def test_fused_guided_sampler_is_one_call_that_matches_the_step_loop(tiny):
    store, source = tiny
    loop = build(store, source, "onnx", num_inference_steps=3, guidance_scale=2.0)
    fused = build(
        store, source, "onnx", num_inference_steps=3, guidance_scale=2.0, fused_sampler=True
    )
    model = onnx.load(str(fused.path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["noise", "class_labels"]
    assert [o.name for o in model.graph.output] == ["images"]
    per_step = fused.metrics["parity"]["runtimes"]["per-step loop (torch-eager)"]
    assert per_step["passed"] and per_step["outputs"]["images"]["max_abs"] < 1e-4
    calls = []

    class Counting(OrtRuntime):
        def infer(self, feeds):
            calls.append(len(feeds[next(iter(feeds))]))
            return super().infer(feeds)

    gate = {"metric": "image_rmse", "threshold": 1e-5, "samples": 16}
    engines = [build(store, a, "ort", gate=gate) for a in (loop, fused)]
    images = []
    for engine in engines:
        runtime, plan = open_engine(engine.path)
        runtime.__class__ = Counting
        images.append(generate(runtime, plan, 7, seed=4, num_classes=10)[0])
    assert calls == [14, 14, 14, 7]  # three doubled-batch steps, then one fused call
    np.testing.assert_allclose(images[1], images[0], atol=1e-4)


@pytest.mark.slow  # unrolled-loop exports, about a minute each
def test_fused_consistency_sampler_takes_the_loops_fresh_noise_as_input(tiny):
    store, source = tiny
    student = build(
        store,
        source,
        "consistency",
        num_inference_steps=3,
        iterations=2,
        batch_size=4,
        solver_steps=10,
    )
    loop = build(store, student, "onnx")
    fused = build(store, student, "onnx", fused_sampler=True)
    inputs = [i.name for i in onnx.load(str(fused.path / "model.onnx")).graph.input]
    assert inputs == ["noise", "class_labels", "step_noise"]
    out = []
    for graph in (loop, fused):
        from accel.core.plan import SamplerPlan

        plan = SamplerPlan.load(graph.path / "sampler_plan.json")
        out.append(generate(OrtRuntime(graph.path / "model.onnx"), plan, 5, 2, 10)[0])
    np.testing.assert_allclose(out[1], out[0], atol=1e-4)
    assert np.abs(out[0]).max() > 0


def test_exported_graph_agrees_with_the_onnx_reference_evaluator(tiny):
    """onnx.reference is an independent (numpy) implementation of the ONNX operators."""
    store, source = tiny
    graph = build(store, source, "onnx", num_inference_steps=2)
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((3, 1, 16, 16)).astype(np.float32),
        "timestep": np.array([999, 500, 0]),
        "class_labels": np.array([1, 10, 4]),
    }
    (expected,) = ReferenceEvaluator(str(graph.path / "model.onnx")).run(None, feeds)
    got = OrtRuntime(graph.path / "model.onnx", optimize=False).infer(feeds)["x0"]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
