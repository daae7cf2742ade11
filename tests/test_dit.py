"""DiT through the whole chain: its training data (the digits, or an imagefolder with a label
column, VAE-encoded and cached like captioned images), consistency distillation, export, compile,
bundle and sample; the student loads in the stock ``DiTPipeline`` (with ``LCMScheduler``) and
draws what ``accel sample`` draws from the same latents and step noise."""

import json

import numpy as np
import pytest
import torch

from accel.core.errors import RecipeError

import families
from tiny import run_cli


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return families.write_pipeline("dit", tmp_path_factory.mktemp("dit") / "teacher")


def test_a_dit_student_goes_through_the_chain_and_loads_in_the_stock_pipeline(
    teacher, tmp_path, monkeypatch, capsys
):
    from diffusers import DiTPipeline

    def accel(*args):
        code, _, err = run_cli(monkeypatch, capsys, *args, "--store", tmp_path / "store")
        assert code == 0, err

    student, bundle = tmp_path / "student", tmp_path / "bundle"
    accel("distill", "consistency", teacher, "--solver-steps", 10, "--num-inference-steps", 2,
          "--iterations", 4, "--batch-size", 8, "--out", student)  # fmt: skip
    info = json.loads((student / "accel.json").read_text())
    assert info["method"] == "consistency" and info["num_inference_steps"] == 2
    accel("export", "onnx", student, "--out", tmp_path / "onnx")
    accel("compile", tmp_path / "onnx", "--gate", "{ samples = 4, seeds = [0] }",
          "--out", tmp_path / "engine")  # fmt: skip
    accel("bundle", tmp_path / "engine", "--out", bundle)
    drawn = {}
    for name, model in (("eager", student), ("bundle", bundle)):
        code, _, err = run_cli(monkeypatch, capsys, "sample", model, "--label", 3, "--label", 5,
                               "--out", tmp_path / f"{name}.npz")  # fmt: skip
        assert code == 0, err
        drawn[name] = np.load(tmp_path / f"{name}.npz")
    np.testing.assert_allclose(drawn["bundle"]["images"], drawn["eager"]["images"], atol=1e-4)

    # the stock pipeline from the same latents and, between LCM's steps, the same fresh noise
    import diffusers.pipelines.dit.pipeline_dit as dit_module
    import diffusers.schedulers.scheduling_lcm as lcm_module

    latents = torch.from_numpy(drawn["eager"]["latents"])
    step_noise = np.random.default_rng([0, 1])  # accel sample's, for --seed 0
    monkeypatch.setattr(dit_module, "randn_tensor", lambda shape, **kw: latents.clone())
    monkeypatch.setattr(
        lcm_module, "randn_tensor",
        lambda shape, **kw: torch.from_numpy(step_noise.standard_normal(tuple(shape), np.float32)),
    )  # fmt: skip
    pipe = DiTPipeline.from_pretrained(student)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    stock = pipe(class_labels=[3, 5], num_inference_steps=2, guidance_scale=1.0,
                 output_type="np").images  # fmt: skip
    np.testing.assert_allclose(stock.transpose(0, 3, 1, 2), drawn["eager"]["images"], atol=1e-4)


def _imagefolder(path, labels, size=32):
    from PIL import Image

    path.mkdir()
    rows = []
    for i, label in enumerate(labels):
        Image.new("RGB", (size, size), (20 * i, 100, 200)).save(path / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "label": label}))
    (path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return path


def test_dit_trains_on_an_imagefolder_with_a_label_column(teacher, tmp_path):
    from distill.checkpoint import load_denoiser
    from distill.data import load_dataset

    denoiser, _ = load_denoiser(teacher)
    folder = _imagefolder(tmp_path / "images", [0, 3, 7])
    latents, cond = load_dataset(f"imagefolder:{folder}", denoiser, tmp_path / "cache")
    assert latents.shape == (3, *denoiser.adapter.latent_shape(32, 32))
    assert cond["class_labels"].tolist() == [0, 3, 7]
    again, _ = load_dataset(f"imagefolder:{folder}", denoiser, tmp_path / "cache")  # the cache
    torch.testing.assert_close(again, latents)

    bad = _imagefolder(tmp_path / "bad", [0, "seven"])
    with pytest.raises(RecipeError, match="label of '1.png' must be a class id"):
        load_dataset(f"imagefolder:{bad}", denoiser, tmp_path / "cache")
    too_many = _imagefolder(tmp_path / "many", [0, denoiser.adapter.num_classes])
    with pytest.raises(RecipeError, match="has classes 0.."):
        load_dataset(f"imagefolder:{too_many}", denoiser, tmp_path / "cache")


@pytest.mark.parametrize(
    "stage, options, method, steps",
    [
        ("progressive", "teacher_steps = 4\nstudent_steps = 2\niterations_per_round = 2",
         "progressive", 2),
        ("adversarial", "student_steps = 1\niterations = 2\ncritic_updates_per_generator = 1",
         "dmd2", 1),
        ("add", "student_steps = 2\niterations = 2", "add", 2),
    ],
)  # fmt: skip
def test_every_latent_training_stage_takes_dit(
    stage, options, method, steps, teacher, tmp_path, monkeypatch, capsys
):
    """DiT takes every training stage a latent family takes, on the digits VAE-encoded with their
    labels, and its student samples the labels asked for."""
    from accel.pipeline import default_store, run_recipe
    from accel.recipe import load_recipe

    (tmp_path / "r.toml").write_text(
        f'name = "dit-{stage}"\nsource = "{teacher}"\ntarget = "cpu"\n'
        f'[[stages]]\nstage = "{stage}"\nbatch_size = 4\n{options}\n'
    )
    (student,) = run_recipe(
        load_recipe(tmp_path / "r.toml"), default_store(tmp_path / "s"), progress=lambda m: None
    )
    info = json.loads((student.path / "accel.json").read_text())
    assert info["method"] == method and info["num_inference_steps"] == steps
    code, _, err = run_cli(monkeypatch, capsys, "sample", student.path, "--label", 3,
                           "--out", tmp_path / "s.npz")  # fmt: skip
    assert code == 0, err
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape[0] == 1 and np.isfinite(images).all()
