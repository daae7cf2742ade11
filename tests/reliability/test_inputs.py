"""The input checks the fuzzing campaign (test_fuzz.py, slow) led to, each on one known case:
prompts that are not text, images with NaN, imagefolder metadata that is not UTF-8 or names an
impossible path, and error messages that quote a huge value."""

import json

import numpy as np
import pytest

from accel.cli import _shorten
from accel.core.errors import CheckpointError, RecipeError
from accel.runtime.loop import check_finite
from accel.runtime.pipeline import check_prompts


def test_prompts_that_are_not_text_are_refused_with_the_place():
    check_prompts(["", "a red circle", "😀", "e\u0301"])  # empty and any Unicode are prompts
    with pytest.raises(ValueError, match=r"prompt 1 is not valid text: '\\udcff' at character 3"):
        check_prompts(["ok", "caf\udcff"])  # what Python makes of the byte 0xff in argv
    with pytest.raises(ValueError, match="prompt 0 is a bytes, not text"):
        check_prompts([b"a red circle"])


def test_images_with_nan_or_inf_are_refused():
    images = np.zeros((3, 1, 4, 4), np.float32)
    check_finite(images, "m")
    images[1, 0, 2, 2] = np.nan
    images[2, 0, 0, 0] = -np.inf
    with pytest.raises(CheckpointError, match="m drew NaN or Inf values in 2 of 3 images"):
        check_finite(images, "m")


def test_imagefolder_metadata_that_is_not_utf8_or_names_an_impossible_path(tmp_path):
    from distill.data import read_imagefolder

    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "caf\xe9.png", "text": "x"}\n')
    with pytest.raises(RecipeError, match="is not UTF-8 text"):
        read_imagefolder(tmp_path, (16, 16))
    for name, reason in [("x" * 5000, "is not a usable path"), (7, "must be a file name"),
                         ("../up.png", "is outside"), ("gone.png", "is missing")]:  # fmt: skip
        row = {"file_name": name, "text": "a seven"}
        (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(RecipeError, match=reason) as e:
            read_imagefolder(tmp_path, (16, 16))
        assert len(str(e.value)) < 400  # the huge name is not quoted whole


def test_error_messages_quoting_a_huge_value_keep_their_ends():
    assert _shorten("short") == "short"
    long = "start " + "x" * 100_000 + " end"
    short = _shorten(long)
    assert len(short) < 4200 and short.startswith("start ") and short.endswith(" end")


def test_an_edited_artifact_claiming_a_stored_key_is_refused(tmp_path, monkeypatch, capsys):
    """An artifact passed by path whose files differ from the stored artifact of its key (edited,
    then its manifest re-hashed) is refused: the store's results of that key are not of it."""
    import shutil

    from accel.core.artifact import MANIFEST, hash_tree

    from tiny import run_cli, write_tiny_pipeline

    model = write_tiny_pipeline(tmp_path / "model")
    store = tmp_path / "store"
    code, _, err = run_cli(monkeypatch, capsys, "export", "onnx", model, "--num-inference-steps",
                           2, "--out", tmp_path / "graph", "--store", store)  # fmt: skip
    assert code == 0, err
    shutil.copytree(tmp_path / "graph", tmp_path / "edited")
    plan = json.loads((tmp_path / "edited" / "sampler_plan.json").read_text())
    plan["guidance_scale"] = 3.0
    (tmp_path / "edited" / "sampler_plan.json").write_text(json.dumps(plan))
    manifest = json.loads((tmp_path / "edited" / MANIFEST).read_text())
    manifest["files"] = hash_tree(tmp_path / "edited")
    (tmp_path / "edited" / MANIFEST).write_text(json.dumps(manifest))
    code, _, err = run_cli(monkeypatch, capsys, "compile", tmp_path / "edited", "--store", store)
    assert code == 1 and "holds another artifact under that key" in err, err


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError(
            "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
            "running MatMul node. Failed to allocate memory for requested buffer of size "
            "84934656000"
        ),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB"),
    ],
)
def test_an_allocation_failure_in_a_stage_is_one_line_naming_what_to_lower(tmp_path, error):
    """numpy's, onnxruntime's and torch's ways of saying an allocation failed, raised inside a
    stage: one StageError naming the stage and what sets its memory, the store left as it was;
    any other RuntimeError is a bug and keeps its traceback."""
    from accel.core.errors import StageError
    from accel.core.stage import Stage
    from accel.core.target import load_target
    from accel.pipeline import default_store, run_or_reuse

    import fake_stages
    from tiny import write_tiny_pipeline

    def fails(ctx):
        (ctx.out / "half.txt").write_text("x")
        raise error

    store = default_store(tmp_path / "store")
    parent = store.source(write_tiny_pipeline(tmp_path / "teacher"))
    stage = Stage("greedy", 1, fake_stages.ShrinkConfig, "checkpoint", "checkpoint", fails)

    def files():
        return sorted(p for p in store.root.rglob("*") if p.is_file())

    before = files()
    with pytest.raises(StageError) as info:
        run_or_reuse(stage, stage.config(), parent, load_target("cpu"), store, lambda m: None)
    message = str(info.value)
    assert "greedy" in message and "out of memory" in message and "\n" not in message
    assert "a smaller [shapes] batch max in the target (now 64" in message
    assert files() == before  # nothing half-written, no temp dir left
    stage = Stage("buggy", 1, fake_stages.ShrinkConfig, "checkpoint", "checkpoint",
                  lambda ctx: (_ for _ in ()).throw(RuntimeError("a bug")))  # fmt: skip
    with pytest.raises(RuntimeError, match="a bug"):
        run_or_reuse(stage, stage.config(), parent, load_target("cpu"), store, lambda m: None)
