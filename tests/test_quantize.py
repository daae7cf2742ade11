"""Quantization passes on a tiny model: Q/DQ graphs that run in onnxruntime, FP8 structure,
calibration on the sampling trajectory, and a quality gate that keeps failures out of the store."""

from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from accel.core.errors import StageError
from accel.demo.digits import generate
from accel.pipeline import default_store
from accel.runtime import OrtRuntime, open_engine
from export.quantize_onnx import calibration_feeds, count_ops
from export.quantize_torch import quantized_op_counts

from tiny import build, write_tiny_pipeline

RMSE = {"metric": "image_rmse", "threshold": 0.2, "samples": 24}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    store = default_store(root / "store")
    source = store.source(write_tiny_pipeline(root / "teacher"))
    return store, source, build(store, source, "onnx", num_inference_steps=3, guidance_scale=2.0)


def initializer_types(path):
    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


def test_calibration_feeds_are_the_sampling_trajectory(tiny):
    _, _, graph = tiny
    runtime = OrtRuntime(graph.path / "model.onnx")
    plan = open_engine_plan(graph)
    feeds = calibration_feeds(runtime, plan, 5, seed=3)
    assert [int(f["timestep"][0]) for f in feeds] == [s.timestep for s in plan.steps]
    for f in feeds:  # guidance 2: the doubled batch, conditional half then the null label
        assert len(f["sample"]) == 10 and (f["timestep"] == f["timestep"][0]).all()
        assert (f["class_labels"][5:] == plan.null_label).all()
        assert list(f["class_labels"][:5]) == [0, 1, 2, 3, 4]
    # each step's sample is the previous step's output: x_1 = a x_0 + b x0_hat
    x0_hat = runtime.infer(feeds[0])["x0"]
    x0_hat = x0_hat[5:] + 2.0 * (x0_hat[:5] - x0_hat[5:])
    step = plan.steps[0]
    expected = step.a * feeds[0]["sample"][:5] + step.b * x0_hat
    np.testing.assert_allclose(feeds[1]["sample"][:5], expected, atol=1e-5)


def test_our_minmax_pass_finds_onnxruntimes_ranges(tiny, tmp_path):
    """accel's min/max pass (the graph reduces each activation, feed by feed) gives the ranges
    onnxruntime's MinMax calibrator gives, tensor for tensor, and the same quantized graph."""
    import shutil

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        create_calibrator,
        quantize_static,
    )

    from export.quantize_onnx import minmax_ranges, quantize_ort_int8

    _, _, graph = tiny
    feeds = calibration_feeds(OrtRuntime(graph.path / "model.onnx"), open_engine_plan(graph), 3, 1)
    src = tmp_path / "model.onnx"
    for f in graph.path.glob("model.onnx*"):
        shutil.copy(f, tmp_path / f.name)
    ops = ["Conv", "MatMul", "Gemm"]
    ours = minmax_ranges(src, feeds, ops)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    calibrator = create_calibrator(src, ops, augmented_model_path=str(tmp_path / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax)  # fmt: skip
    calibrator.collect_data(Reader())
    theirs = calibrator.compute_data()
    assert set(ours) == set(theirs.data) and len(ours) > 10
    for name, (lo, hi) in ours.items():
        assert lo.dtype == hi.dtype == np.float32 and lo.shape == hi.shape == (1,)
        np.testing.assert_array_equal(lo, theirs[name].range_value[0], err_msg=name)
        np.testing.assert_array_equal(hi, theirs[name].range_value[1], err_msg=name)
    # the quantized graphs: ours through onnxruntime's calibration cache, theirs calibrated
    quantize_ort_int8(src, tmp_path / "ours.onnx", feeds, ops, None, "uint8")
    quantize_static(str(src), str(tmp_path / "theirs.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=ops, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)  # fmt: skip
    a, b = (onnx.load(str(tmp_path / f)) for f in ("ours.onnx", "theirs.onnx"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in b.graph.initializer}
    for t in a.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), weights[t.name])


def open_engine_plan(artifact):
    from accel.core.plan import SamplerPlan

    return SamplerPlan.load(artifact.path / "sampler_plan.json")


@pytest.mark.parametrize(
    "method, calibration, activations",
    [
        ("ort_int8", None, "int8"),
        ("ort_int8", "entropy", "uint8"),
        ("modelopt_int8", "minmax", None),
        ("modelopt_fp8", None, None),
    ],
)
def test_onnx_ptq_inserts_qdq_that_onnxruntime_runs_behind_the_gate(
    tiny, method, calibration, activations
):
    store, _, graph = tiny
    q = build(
        store,
        graph,
        "quantize",
        method=method,
        calibration_method=calibration,
        **({"activations": activations} if activations else {}),
        calibration_samples=8,
        gate=RMSE,
    )
    if activations == "uint8":
        assert TensorProto.UINT8 in initializer_types(q.path / "model.onnx")
    fp8 = method.endswith("fp8")
    ops = count_ops(q.path / "model.onnx")
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert (TensorProto.FLOAT8E4M3FN if fp8 else TensorProto.INT8) in initializer_types(
        q.path / "model.onnx"
    )
    assert q.info["precision"] == ("fp8" if fp8 else "int8")
    assert q.info["calibration_feeds"] == 3  # 8 images in one chunk, 3 steps
    gate = q.metrics["quality_gate"]
    assert gate["passed"] and 0 < gate["value"] <= RMSE["threshold"]
    engine = build(store, q, "ort", gate=RMSE)
    runtime, plan = open_engine(engine.path)
    images, _ = generate(runtime, plan, 4, seed=0, num_classes=10)
    assert np.isfinite(images).all()


def test_fd_gate_compares_with_the_parent_and_a_failed_gate_leaves_no_artifact(tiny):
    store, _, graph = tiny
    q = build(
        store,
        graph,
        "quantize",
        calibration_samples=8,
        gate={"metric": "fd_digits", "threshold": 1.0, "samples": 40},
    )
    gate = q.metrics["quality_gate"]
    assert gate["parent"]["fd_digits"] > 0 and gate["candidate"]["fd_digits"] > 0
    assert gate["value"] == pytest.approx(
        gate["candidate"]["fd_digits"] / gate["parent"]["fd_digits"] - 1
    )
    before = sorted(p.name for p in store.artifacts.iterdir())
    with pytest.raises(StageError, match="quality gate failed: image RMS difference"):
        build(
            store,
            graph,
            "quantize",
            calibration_samples=8,
            gate={"metric": "image_rmse", "threshold": 0.0, "samples": 8},
        )
    assert sorted(p.name for p in store.artifacts.iterdir()) == before
    assert not any(store.root.joinpath("tmp").iterdir())


def test_fd_gate_refuses_images_that_are_not_digits():
    from accel.core.plan import SamplerPlan
    from export.quality_gate import GateConfig, quality_gate

    plan = SamplerPlan(steps=[], sample_shape=[3, 8, 8])
    with pytest.raises(StageError, match='set gate.metric = "image_rmse"'):
        gate = GateConfig(metric="fd_digits")
        quality_gate("quantize", gate, (None, plan), (None, plan), lambda m: None)


def test_the_default_gate_metric_comes_from_the_model():
    from accel.core.plan import SamplerPlan
    from export.quality_gate import default_metric

    digits = SamplerPlan(steps=[], sample_shape=[1, 16, 16], metric="fd_digits")
    assert default_metric(digits) == "fd_digits"  # what its accel.json names
    assert default_metric(SamplerPlan(steps=[], sample_shape=[1, 16, 16])) == "image_rmse"


def test_quantizing_a_qdq_graph_with_unknown_op_types_says_so(tiny):
    store, _, graph = tiny
    with pytest.raises(StageError, match="inserted no Q/DQ nodes"):
        build(store, graph, "quantize", op_types=["Einsum"], calibration_samples=2, gate=RMSE)


def test_modelopt_torch_int8_smoothquant_exports_qdq_for_onnxruntime(tiny):
    store, source, _ = tiny
    q = build(
        store, source, "quantize_torch", num_inference_steps=3, calibration_samples=8, gate=RMSE
    )
    ops = quantized_op_counts(q.path / "model.onnx")
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert q.metrics["quality_gate"]["runtime"] == "onnxruntime"
    assert q.info["quantizer"] == "modelopt.torch:INT8_SMOOTHQUANT_CFG"
    runtime = OrtRuntime(q.path / "model.onnx")
    images, _ = generate(runtime, open_engine_plan(q), 4, seed=0, num_classes=10)
    assert np.isfinite(images).all()


def test_modelopt_torch_fp8_graph_has_tensorrt_fp8_qdq_and_onnxruntime_refuses_it(tiny):
    store, source, _ = tiny
    q = build(
        store,
        source,
        "quantize_torch",
        method="fp8",
        num_inference_steps=3,
        calibration_samples=8,
        gate=RMSE,
    )
    model = onnx.load(str(q.path / "model.onnx"))
    assert {o.domain for o in model.opset_import} >= {"", "trt"}
    ops = quantized_op_counts(q.path / "model.onnx")
    assert ops["trt::TRT_FP8QuantizeLinear"] == ops["trt::TRT_FP8DequantizeLinear"] > 0
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    for node in model.graph.node:  # every FP8 quantize feeds a dequantize with the same scale
        if node.op_type == "TRT_FP8QuantizeLinear":
            consumers = [n for n in model.graph.node if node.output[0] in n.input]
            assert consumers and all(c.op_type == "TRT_FP8DequantizeLinear" for c in consumers)
            scale = values[node.input[1]]
            assert scale.dtype == np.float32 and (scale > 0).all()
            assert all(np.array_equal(values[c.input[1]], scale) for c in consumers)
    assert q.info["precision"] == "fp8" and "fake-quant" in q.metrics["quality_gate"]["runtime"]
    with pytest.raises(StageError, match="run only in TensorRT"):
        build(store, q, "ort", gate=RMSE)


def test_calibration_follows_a_w_input_graph(tiny):
    _, _, graph = tiny
    plan = replace(open_engine_plan(graph), guidance_scale=1.0)
    feeds = calibration_feeds(OrtRuntime(graph.path / "model.onnx"), plan, 3, seed=0)
    assert all(len(f["sample"]) == 3 for f in feeds)  # no guidance: no doubled batch


def test_recipe_branches_an_int8_engine_beside_the_fp32_one(tmp_path):
    from accel.pipeline import run_recipe
    from accel.recipe import load_recipe

    write_tiny_pipeline(tmp_path / "teacher")
    gate = '{ metric = "image_rmse", threshold = 0.5, samples = 8 }'
    (tmp_path / "r.toml").write_text(
        'name = "branch"\nsource = "teacher"\ntarget = "cpu"\n'
        f'[[stages]]\nstage = "onnx"\nid = "graph"\nnum_inference_steps = 2\n'
        f'[[stages]]\nstage = "ort"\ngate = {gate}\n'
        f'[[stages]]\nstage = "quantize"\nafter = "graph"\ncalibration_samples = 4\ngate = {gate}\n'
        f'[[stages]]\nstage = "ort"\ngate = {gate}\n'
    )
    store = default_store(tmp_path / "store")
    graph, fp32, int8_graph, int8 = run_recipe(
        load_recipe(tmp_path / "r.toml"), store, progress=lambda m: None
    )
    assert fp32.parent == graph.key and int8_graph.parent == graph.key
    assert int8.parent == int8_graph.key and int8.info["precision"] == "int8"
    assert fp32.info["precision"] == "fp32"
    again = run_recipe(load_recipe(tmp_path / "r.toml"), store, progress=lambda m: None)
    assert [a.key for a in again] == [a.key for a in (graph, fp32, int8_graph, int8)]


@pytest.mark.slow  # a fused-sampler export, about half a minute
def test_a_fused_sampler_graph_is_refused_with_the_way_out(tiny):
    store, source, _ = tiny
    fused = build(store, source, "onnx", num_inference_steps=2, fused_sampler=True)
    with pytest.raises(StageError, match="fused-sampler graph; quantize the per-step graph"):
        build(store, fused, "quantize", calibration_samples=2, gate=RMSE)


def test_quantize_works_in_a_store_given_by_a_relative_path(tmp_path, monkeypatch):
    """The quantizers run in a scratch working directory: the store's paths must not depend on
    the working directory (`accel demo` uses ./.accel-store)."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    store = default_store(".accel-store")
    source = store.source(write_tiny_pipeline(Path("teacher")))
    graph = build(store, source, "onnx", num_inference_steps=2)
    q = build(store, graph, "quantize", calibration_samples=2, gate=RMSE)
    assert q.path.is_absolute() and q.info["precision"] == "int8"
