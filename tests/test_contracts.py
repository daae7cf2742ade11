"""The student's ``accel.json`` (ModelInfo) and the engine description (EngineInfo) as typed,
versioned contracts: round trips, files of the first format read into the typed fields, and
malformed ones refused with the reason, by the API and by the CLI in one line."""

import json
import shutil
from pathlib import Path

import pytest

from accel.core.engine_info import ENGINE_FORMAT, EngineInfo
from accel.core.errors import CheckpointError
from accel.core.model_info import (
    MODEL_INFO_FORMAT,
    ConsistencySpec,
    GuidanceEmbedding,
    ModelInfo,
)
from accel.pipeline import default_store

from tiny import run_cli, write_tiny_pipeline

TEACHER = Path(__file__).resolve().parents[1] / "accel" / "assets" / "teacher"


def test_model_info_round_trip(tmp_path):
    info = ModelInfo(
        method="dmd2",
        num_inference_steps=2,
        guidance_scale=1.0,
        distilled_guidance_scale=2.0,
        num_classes=10,
        consistency=ConsistencySpec(4),
    )
    info.write(tmp_path)
    data = json.loads((tmp_path / "accel.json").read_text())
    assert data["format"] == MODEL_INFO_FORMAT and "null_class_label" not in data
    back = ModelInfo.read(tmp_path)
    assert back == info and back.is_student and back.consistency.timestep_scaling == 10.0
    guided = ModelInfo(
        method="guidance", guidance_embedding={"scales": [1.0, 2.0], "num_labels": 11}
    )
    assert guided.guidance_embedding == GuidanceEmbedding([1.0, 2.0], 11)


def test_the_shipped_teacher_of_the_first_format_reads(tmp_path):
    info = ModelInfo.read(TEACHER)  # written before the format key existed
    assert info.null_class_label == 10 and info.num_classes == 10 and not info.is_student
    assert info.training["steps"] == 5000
    assert ModelInfo.read(tmp_path) == ModelInfo()  # no accel.json: a plain teacher


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"num_inference_step": 4}, r"unknown keys \['num_inference_step'\]"),
        ({"method": "magic"}, "method 'magic' is not one of"),
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer >= 1"),
        ({"num_inference_steps": "4"}, "num_inference_steps must be an integer"),
        ({"guidance_scale": "high"}, "guidance_scale must be a finite number"),
        ({"null_class_label": True}, "null_class_label must be an integer"),
        ({"consistency": {"solver_steps": 4, "sigma": 1}}, "unexpected keyword argument 'sigma'"),
        ({"guidance_embedding": {"scales": [], "num_labels": 2}}, "non-empty list"),
        ({"format": "accel.model/7"}, "format 'accel.model/7'"),
        ({"evaluation": {"prompt": ["a"]}}, r"unknown keys \['prompt'\] in evaluation"),
        ({"evaluation": {"metric": 3}}, "evaluation.metric must be a metric name"),
        ({"evaluation": {"prompts": ["a", " "]}}, "evaluation.prompts must be a non-empty list"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_malformed_accel_json_is_refused_with_the_reason(tmp_path, data, reason):
    (tmp_path / "accel.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=reason):
        ModelInfo.read(tmp_path)


def test_a_pipeline_with_a_broken_accel_json_is_one_line_from_the_cli(
    tmp_path, monkeypatch, capsys
):
    model = write_tiny_pipeline(tmp_path / "model")
    info = json.loads((model / "accel.json").read_text())
    (model / "accel.json").write_text(json.dumps(dict(info, null_class_label="ten")))
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", model, "-n", "1", "--out", tmp_path / "x.npz"
    )
    assert code != 0 and "Traceback" not in err
    assert "accel.json is not a valid accel.json (null_class_label must be an integer" in err
    assert not (tmp_path / "x.npz").exists()


def _ort(**kw):
    return EngineInfo(backend="ort", engine_file="model.onnx", library_version="1.23.0",
                      options={"provider": "CPUExecutionProvider"}, **kw)  # fmt: skip


def test_engine_info_round_trip_and_the_earlier_formats():
    info = _ort(batch_range=[1, 8], precision="int8")
    assert (
        EngineInfo.from_dict(info.to_dict()) == info and info.to_dict()["format"] == ENGINE_FORMAT
    )
    assert info.max_batch == 8 and _ort().max_batch == 2**31
    legacy = {"backend": "onnxruntime", "provider": "CPUExecutionProvider", "provider_options": {},
              "onnxruntime_version": "1.22.1", "engine_file": "model.onnx", "precision": "fp32"}  # fmt: skip
    old = EngineInfo.from_dict(legacy)
    assert old.backend == "ort" and old.library_version == "1.22.1" and old.device == "cpu"
    assert old.options == {"provider": "CPUExecutionProvider", "provider_options": {}}
    trt = {"backend": "tensorrt", "engine_file": "model.plan", "tensorrt_version": "10.13",
           "gpu": "H100", "compute_capability": "9.0", "hardware_compatibility": "none",
           "version_compatible": False, "strongly_typed": True, "precision": "fp8",
           "batch_range": [1, 32]}  # fmt: skip
    t = EngineInfo.from_dict(trt)
    assert t.library_version == "10.13" and t.options["strongly_typed"] is True
    assert t.options["compute_capability"] == "9.0"
    v1 = {"backend": "torch-compiled", "engine_file": "checkpoint", "library_version": "2.13.0",
          "precision": "fp32", "device": "cpu", "batch_range": [1, 64], "inputs": None,
          "provider": None, "gpu": None, "compute_capability": None,
          "hardware_compatibility": None, "version_compatible": False, "strongly_typed": False,
          "provider_options": {"mode": "default", "cuda_graph": "0", "opt_batch": "4",
                               "target_fingerprint": "abc"}, "format": "accel.engine/1"}  # fmt: skip
    torch_engine = EngineInfo.from_dict(v1)
    assert torch_engine.backend == "torch_compile" and torch_engine.format == ENGINE_FORMAT
    assert torch_engine.options == {
        "mode": "default", "cuda_graph": False, "opt_batch": 4, "target_fingerprint": "abc"
    }  # fmt: skip
    aoti = dict(v1, backend="aotinductor", engine_file="model.pt2", provider_options=None,
                inputs=["sample", "timestep"])  # fmt: skip
    assert EngineInfo.from_dict(aoti).options == {"inputs": ["sample", "timestep"]}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"backnd": "x"}, r"unknown keys \['backnd'\]"),
        ({"precision": "int4"}, "precision 'int4' is not one of"),
        ({"device": "tpu"}, "device 'tpu' is not one of"),
        ({"batch_range": [4, 2]}, "batch_range must be"),
        ({"batch_range": [1]}, "batch_range must be"),
        ({"engine_file": "../../etc/passwd"}, "engine_file must be a file name"),
        ({"library_version": ""}, "library_version must be a non-empty string"),
        ({"backend": "onnxruntime"}, "backend 'onnxruntime' is not one of ort, "),
        ({"options": {"gpu": "H100"}}, r"unknown ort options \['gpu'\]"),
        ({"options": {"provider": 3}}, "option provider must be a JSON str"),
        ({"format": "accel.engine/0"}, "format 'accel.engine/0'"),
    ],
)
def test_malformed_engine_descriptions_are_refused(change, reason):
    with pytest.raises(CheckpointError, match=reason):
        EngineInfo.from_dict(dict(_ort().to_dict(), **change), "engine X")


def test_an_engine_with_a_broken_description_is_one_line_from_the_cli(
    tmp_path, monkeypatch, capsys
):
    store = default_store(tmp_path / "store")
    with store.write("e" * 16, kind="engine", stage="ort", stage_version=2, config={},
                     parent=None) as pending:  # fmt: skip
        (pending.dir / "model.onnx").write_bytes(b"not read")
        pending.info.update(dict(_ort().to_dict(), precision="int3"))
    engine = store.get("e" * 16)
    code, _, err = run_cli(monkeypatch, capsys, "sample", engine.path, "-n", "1",
                           "--out", tmp_path / "x.npz")  # fmt: skip
    assert code != 0 and "Traceback" not in err
    assert "has no valid engine description (precision 'int3' is not one of" in err
    shutil.rmtree(tmp_path / "store")


def test_files_of_the_previous_formats_read_as_the_current_one(tmp_path):
    """accel.model/1 (no consistency.grid) and accel.plan/3 (no flow_shift) read unchanged;
    a grid other than the two known ones is refused."""
    from accel.core.plan import PLAN_FORMAT, SamplerPlan

    (tmp_path / "accel.json").write_text(json.dumps({
        "method": "consistency", "num_inference_steps": 4,
        "consistency": {"solver_steps": 50, "sigma_data": 0.0, "timestep_scaling": 0.0},
        "format": "accel.model/1",
    }))  # fmt: skip
    info = ModelInfo.read(tmp_path)
    assert info.format == MODEL_INFO_FORMAT and info.consistency.grid == "scheduler"
    plan = {"steps": [{"timestep": 999, "a": 0.0, "b": 1.0}], "sample_shape": [1, 4, 4],
            "format": "accel.plan/3"}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    loaded = SamplerPlan.load(tmp_path / "plan.json")
    assert loaded.format == PLAN_FORMAT and loaded.flow_shift is None
    with pytest.raises(ValueError, match="grid must be 'scheduler' or 'trigflow'"):
        ConsistencySpec(4, grid="karras")
