"""The sampler plan as a typed, versioned contract: round trip, the first format's notes read into
typed fields, and malformed plans refused with the reason."""

import json

import pytest

from accel.core.errors import CheckpointError
from accel.core.plan import PLAN_FORMAT, SamplerPlan, Step


def _plan(**kw):
    steps = [{"timestep": 999, "a": 0.5, "b": 0.4}, {"timestep": 499, "a": 0.0, "b": 1.0}]
    return SamplerPlan(steps=steps, sample_shape=[1, 16, 16], **kw)


def test_round_trip_keeps_every_field(tmp_path):
    plan = _plan(guidance_scale=1.5, null_label=10, num_classes=10, sampler="consistency",
                 guidance_input=True)  # fmt: skip
    plan.save(tmp_path / "p.json")
    back = SamplerPlan.load(tmp_path / "p.json")
    assert back == plan and back.steps[0] == Step(999, 0.5, 0.4, 0.0)
    assert json.loads((tmp_path / "p.json").read_text())["format"] == PLAN_FORMAT


def test_first_format_notes_become_typed_fields(tmp_path):
    old = {
        "steps": [{"timestep": 999, "a": 0.0, "b": 1.0}],
        "sample_shape": [1, 16, 16],
        "guidance_scale": 1.0,
        "null_label": None,
        "num_classes": 10,
        "init_noise_sigma": 1.0,
        "notes": {"sampler": "ddim", "graph_output": "images", "fused": True,
                  "prediction_type": "v_prediction", "guidance_input": False},
    }  # fmt: skip
    (tmp_path / "p.json").write_text(json.dumps(old))
    plan = SamplerPlan.load(tmp_path / "p.json")
    assert plan.fused and plan.graph_output == "images" and plan.prediction_type == "v_prediction"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"stepz": []}, "unknown keys \\['stepz'\\]"),
        ({"steps": []}, "no steps"),
        ({"steps": [{"timestep": "999", "a": 1, "b": 0}]}, "step timestep must be a finite number"),
        ({"steps": [{"timestep": 1, "a": float("nan"), "b": 0}]}, "step a must be a finite"),
        ({"sampler": "heun"}, "sampler 'heun' is not one of"),
        ({"sample_shape": [1, -16, 16]}, "sample_shape must be positive"),
        ({"format": "accel.plan/9"}, "format 'accel.plan/9'"),
        ({"init_noise_sigma": {"k": 1}}, "init_noise_sigma must be <class 'float'>"),
        ({"guidance_input": 1}, "guidance_input must be <class 'bool'>"),
        ({"null_label": True}, "null_label must be int | None"),
        ({"conditioning": {"class_labels": {"axes": 3}}}, "axes must be a list"),
        ({"components": ["text_encoder"]}, "components must be dict"),
        ({"sample_shape": [1, 100000, 100000]}, "at most 268435456 values"),
        ({"guidance_scale": float("inf")}, "guidance_scale must be finite"),
    ],
)
def test_malformed_plans_are_refused_with_the_reason(tmp_path, change, reason):
    data = json.loads(json.dumps(_plan().__dict__, default=lambda s: s.__dict__))
    data.update(change)
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=reason):
        SamplerPlan.load(tmp_path / "p.json")


def test_a_plan_that_is_not_json_is_refused(tmp_path):
    (tmp_path / "p.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not a valid sampler plan"):
        SamplerPlan.load(tmp_path / "p.json")
