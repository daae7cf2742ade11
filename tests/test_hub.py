"""Checkpoints as users name them (``accel.core.hub``): a Hub id resolved through an offline
Hugging Face cache laid out as huggingface_hub lays it out (blobs, snapshot links, refs), a
revision, and a weights variant read under the plain names the loaders know."""

import hashlib
import json
import os

import numpy as np
import pytest

import families
from tiny import run_cli

COMMIT_1, COMMIT_2 = "1" * 40, "2" * 40


def _hub_cache(cache, repo, folder, commit, ref="main"):
    """``folder``'s files as the snapshot ``commit`` of Hub repo ``repo`` in ``cache``: each file
    a blob named by its hash, linked from the snapshot, ``refs/REF`` naming the commit."""
    base = cache / ("models--" + repo.replace("/", "--"))
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs").mkdir(exist_ok=True)
    (base / "refs" / ref).write_text(commit)
    return base / "snapshots" / commit


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return (families.write_pipeline("sd15", root / "v1", seed=0),
            families.write_pipeline("sd15", root / "v2", seed=1))  # fmt: skip


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, pipelines):
    cache = tmp_path / "hf" / "hub"
    _hub_cache(cache, "acme/tiny-sd", pipelines[0], COMMIT_1)
    _hub_cache(cache, "acme/tiny-sd", pipelines[1], COMMIT_2, ref="v2")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ACCEL_CACHE", str(tmp_path / "accel-cache"))
    return cache


def _sample(monkeypatch, capsys, tmp_path, model, *extra):
    out = tmp_path / f"s{len(list(tmp_path.glob('s*.npz')))}.npz"
    code, _, err = run_cli(monkeypatch, capsys, "sample", model, "--prompt", "a red circle",
                           "--steps", 2, "--out", out, *extra)  # fmt: skip
    assert code == 0, err
    return np.load(out)["images"]


def test_a_hub_id_resolves_from_an_offline_cache(
    offline_cache, pipelines, tmp_path, monkeypatch, capsys
):
    from accel.core.hub import resolve_model

    assert (
        resolve_model("acme/tiny-sd")
        == offline_cache / "models--acme--tiny-sd" / "snapshots" / COMMIT_1
    )
    assert resolve_model("acme/tiny-sd", revision="v2").name == COMMIT_2
    by_id = _sample(monkeypatch, capsys, tmp_path, "acme/tiny-sd")
    np.testing.assert_array_equal(by_id, _sample(monkeypatch, capsys, tmp_path, pipelines[0]))
    at_v2 = _sample(monkeypatch, capsys, tmp_path, "acme/tiny-sd", "--revision", "v2")
    np.testing.assert_array_equal(at_v2, _sample(monkeypatch, capsys, tmp_path, pipelines[1]))
    assert np.abs(by_id - at_v2).max() > 1e-3

    # a recipe names it the same way, and a stage takes it as INPUT
    (tmp_path / "r.toml").write_text(
        'name = "hub"\nsource = "acme/tiny-sd"\nrevision = "v2"\ntarget = "cpu"\n'
        '[[stages]]\nstage = "onnx"\nnum_inference_steps = 2\n'
    )
    code, out, err = run_cli(monkeypatch, capsys, "plan", tmp_path / "r.toml",
                             "--store", tmp_path / "store")  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    "args, words",
    [
        (("acme/missing",), ["acme/missing@main", "not in the Hub cache", "HF_HUB_OFFLINE"]),
        (("acme/tiny-sd", "--revision", "v9"), ["acme/tiny-sd@v9", "not in the Hub cache"]),
        (("acme/tiny-sd", "--variant", "fp16"), ["no 'fp16' variant weights"]),
    ],
)
def test_what_cannot_be_resolved_is_one_line(
    offline_cache, args, words, tmp_path, monkeypatch, capsys
):
    code, _, err = run_cli(monkeypatch, capsys, "sample", *args, "--prompt", "a red circle",
                           "--out", tmp_path / "x.npz")  # fmt: skip
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "x.npz").exists()


def test_a_revision_is_for_hub_ids(pipelines, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "sample", pipelines[0], "--revision", "v2",
                           "--prompt", "x", "--out", tmp_path / "x.npz")  # fmt: skip
    assert code != 0 and "applies to Hub ids" in err


def test_a_variant_is_read_under_the_plain_names(pipelines, tmp_path, monkeypatch, capsys):
    """A folder saved with ``variant="fp16"`` (its weights as ``*.fp16.safetensors`` beside the
    full-precision ones) is read with --variant fp16: the fp16 weights, through a folder of links
    the loaders read, with the fp16 bytes (the same figures as the full-precision model's rounded
    to fp16)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from accel.core.hub import resolve_model

    monkeypatch.setenv("ACCEL_CACHE", str(tmp_path / "accel-cache"))
    folder = tmp_path / "sd"
    shutil.copytree(pipelines[0], folder)
    for weights in folder.glob("*/*.safetensors"):
        half = {k: v.half() if v.is_floating_point() else v for k, v in load_file(weights).items()}
        save_file(half, weights.with_name(weights.stem + ".fp16.safetensors"))
    view = resolve_model(folder, variant="fp16")
    assert view != folder and resolve_model(folder, variant="fp16") == view  # cached
    unet = load_file(view / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in unet.values() if v.is_floating_point())
    assert not list(view.rglob("*.fp16.safetensors"))
    assert json.loads((view / "model_index.json").read_text())["_class_name"]
    full = _sample(monkeypatch, capsys, tmp_path, folder)
    half = _sample(monkeypatch, capsys, tmp_path, folder, "--variant", "fp16")
    assert 0 < np.abs(full - half).max() < 0.05
