"""A family is an adapter, one row and one builder: a test family (a renamed copy of the SD
adapter, registered in ``ADAPTERS`` for this test only, its pipeline from a builder of its own)
samples, exports, compiles, bundles and profiles with nothing else added, because stages ask the
adapter for capabilities and never list family names."""

import json

import numpy as np
import pytest

from distill.models.sd import StableDiffusionAdapter

import families
from tiny import run_cli


class TinyDiffusionAdapter(StableDiffusionAdapter):
    """The test family: Stable Diffusion's adapter under another name."""

    family = "tinydiffusion"

    @classmethod
    def family_of(cls, config):
        return cls.family


def build_tinydiffusion(path):
    """The test family's tiny builder (the stock SD 1.5 pipeline, its own accel.json)."""
    return families.write_pipeline("sd15", path)


@pytest.fixture
def new_family(monkeypatch):
    from distill import models

    monkeypatch.setitem(models.ADAPTERS, "UNet2DConditionModel", f"{__name__}:TinyDiffusionAdapter")


def test_a_new_family_needs_only_its_adapter_one_row_and_a_builder(
    new_family, tmp_path, monkeypatch, capsys
):
    def accel(*args):
        code, out, err = run_cli(monkeypatch, capsys, *args)
        assert code == 0, err
        return out

    store = ["--store", tmp_path / "store"]
    teacher = build_tinydiffusion(tmp_path / "teacher")
    accel("sample", teacher, "--prompt", "a red circle", "--steps", 2, "--out", tmp_path / "t.npz")
    accel("export", "onnx", teacher, "--num-inference-steps", 2, "--out", tmp_path / "onnx", *store)
    plan = json.loads((tmp_path / "onnx" / "sampler_plan.json").read_text())
    assert plan["family"] == "tinydiffusion" and plan["components"]
    accel("compile", tmp_path / "onnx", "--gate", "{ samples = 4, seeds = [0] }",
          "--out", tmp_path / "engine", *store)  # fmt: skip
    accel("bundle", tmp_path / "engine", "--out", tmp_path / "bundle", *store)
    accel("sample", tmp_path / "bundle", "--prompt", "a red circle", "--out", tmp_path / "b.npz")
    eager = np.load(tmp_path / "t.npz")["images"]
    engine = np.load(tmp_path / "b.npz")["images"]
    assert engine.shape == eager.shape and np.abs(engine - eager).max() < 1e-3
    accel("profile", tmp_path / "bundle", "--target", "cpu", "--warmup-iterations", 0,
          "--warmup-ms", 0, "--iterations", 1, "--out", tmp_path / "profile")  # fmt: skip
    report = json.loads((tmp_path / "profile" / "report.json").read_text())
    (sections,) = report["breakdown"].values()
    assert "text encoding" in sections and "vae decode" in sections
