import json

import pytest

from accel.core.artifact import MANIFEST, Artifact, Store, artifact_key, sha256_file
from accel.core.errors import CheckpointError

WRITE = {
    "kind": "checkpoint",
    "stage": "shrink",
    "stage_version": 1,
    "config": {"steps": 4},
    "parent": None,
}


def put(store: Store, key: str, text: str = "weights", **overrides) -> Artifact:
    with store.write(key, **{**WRITE, **overrides}) as pending:
        (pending.dir / "sub").mkdir()
        (pending.dir / "sub" / "model.bin").write_text(text)
        (pending.dir / "config.json").write_text("{}")
        pending.metrics["loss"] = 0.5
    assert pending.artifact is not None
    return pending.artifact


def leftovers(store: Store) -> list:
    return [p for d in (store.artifacts, store.tmp) if d.exists() for p in d.iterdir()]


def test_write_commits_manifest_and_hashes(tmp_path):
    store = Store(tmp_path)
    art = put(store, "k1")
    assert store.has("k1") and art.path == store.path("k1")
    manifest = json.loads((art.path / MANIFEST).read_text())
    assert manifest["files"] == {
        "config.json": sha256_file(art.path / "config.json"),
        "sub/model.bin": sha256_file(art.path / "sub" / "model.bin"),
    }
    assert (art.key, art.kind, art.stage, art.config, art.metrics) == (
        "k1",
        "checkpoint",
        "shrink",
        {"steps": 4},
        {"loss": 0.5},
    )
    assert {"created", "tool_versions", "stage_version", "info", "target"} <= manifest.keys()
    assert not store.tmp.exists() or list(store.tmp.iterdir()) == []
    art.verify()


def test_dir_without_manifest_does_not_exist(tmp_path):
    store = Store(tmp_path)
    store.path("k1").mkdir(parents=True)
    (store.path("k1") / "model.bin").write_text("half")
    assert not store.has("k1")
    with pytest.raises(CheckpointError, match="not in the store"):
        store.get("k1")
    with pytest.raises(CheckpointError, match="unfinished write"):
        Artifact.load(store.path("k1"))
    put(store, "k1")  # a later write replaces the leftover
    assert store.get("k1").files.keys() == {"config.json", "sub/model.bin"}


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_inside_write_leaves_store_unchanged(tmp_path, exc):
    store = Store(tmp_path)
    with pytest.raises(exc), store.write("k1", **WRITE) as pending:
        (pending.dir / "model.bin").write_text("partial")
        raise exc()
    assert not store.has("k1")
    assert leftovers(store) == []


def test_second_write_of_existing_key_keeps_first(tmp_path):
    store = Store(tmp_path)
    first = put(store, "k1", text="first")
    second = put(store, "k1", text="second")
    assert (second.path / "sub" / "model.bin").read_text() == "first"
    assert second.manifest == first.manifest
    assert not store.tmp.exists() or list(store.tmp.iterdir()) == []


def test_verify_catches_tampered_and_missing_files(tmp_path):
    store = Store(tmp_path)
    art = put(store, "k1")
    (art.path / "sub" / "model.bin").write_text("edited")
    with pytest.raises(
        CheckpointError, match=r"sub/model.bin .*modified after it was written.*delete"
    ):
        art.verify()
    (art.path / "sub" / "model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"sub/model.bin .*missing"):
        art.verify()


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    store = Store(tmp_path)
    art = put(store, "k1")
    (art.path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON.*delete the artifact directory"):
        store.get("k1")
    with pytest.raises(CheckpointError, match="artifact directory not found"):
        Artifact.load(tmp_path / "nowhere")


def test_key_depends_on_exactly_its_inputs():
    base = artifact_key("onnx", 1, {"a": 1, "b": [1, 2]}, "p", None)
    assert base == artifact_key("onnx", 1, {"b": [1, 2], "a": 1}, "p", None)
    assert len(base) == 20
    variants = [
        artifact_key("ort", 1, {"a": 1, "b": [1, 2]}, "p", None),
        artifact_key("onnx", 2, {"a": 1, "b": [1, 2]}, "p", None),
        artifact_key("onnx", 1, {"a": 2, "b": [1, 2]}, "p", None),
        artifact_key("onnx", 1, {"a": 1, "b": [1, 2]}, "q", None),
        artifact_key("onnx", 1, {"a": 1, "b": [1, 2]}, None, None),
        artifact_key("onnx", 1, {"a": 1, "b": [1, 2]}, "p", "fp"),
    ]
    assert len({base, *variants}) == 7


def test_lineage_follows_parents(tmp_path):
    store = Store(tmp_path)
    put(store, "a")
    put(store, "b", parent="a")
    c = put(store, "c", parent="b", kind="onnx")
    assert [x.key for x in store.lineage(c)] == ["c", "b", "a"]
    orphan = put(store, "d", parent="gone")
    assert [x.key for x in store.lineage(orphan)] == ["d"]


def test_add_source_copies_once_and_is_content_addressed(tmp_path):
    src = tmp_path / "teacher"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    store = Store(tmp_path / "store")
    art = store.add_source(src)
    assert (art.kind, art.stage, art.parent) == ("checkpoint", "source", None)
    assert set(art.files) == {"model_index.json", "unet/diffusion_pytorch_model.safetensors"}
    assert art.key == artifact_key("source", 1, {"files": art.files}, None)
    art.verify()
    assert store.add_source(src).key == art.key
    (src / "model_index.json").write_text('{"changed": 1}')
    assert store.add_source(src).key != art.key
    with pytest.raises(CheckpointError, match="source checkpoint not found"):
        store.add_source(tmp_path / "missing")


def test_clean_tmp_removes_only_stale_dirs(tmp_path):
    store = Store(tmp_path)
    (store.tmp / "old").mkdir(parents=True)
    assert store.clean_tmp(older_than_s=3600) == 0
    assert store.clean_tmp(older_than_s=-1) == 1
    assert not store.tmp.exists() or list(store.tmp.iterdir()) == []


def test_clean_tmp_removes_a_dead_writers_dir_at_once_and_keeps_a_live_ones(tmp_path):
    """A writer's temp dir is named after its key and written under the key's claim: one whose
    claim is free (its writer died) goes at once, one whose claim is held stays."""
    store = Store(tmp_path)
    dead, live = "a" * 20, "b" * 20
    (store.tmp / f"{dead}.x1").mkdir(parents=True)
    (store.tmp / f"{live}.x2").mkdir()
    with store.claim(live):
        code = (
            "import sys; from accel.core.artifact import Store; "
            "print(Store(sys.argv[1]).clean_tmp())"
        )
        import subprocess
        import sys

        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    assert out.strip() == "1"
    assert [d.name for d in store.tmp.iterdir()] == [f"{live}.x2"]


def test_clean_tmp_removes_the_work_dir_of_a_stored_key(tmp_path):
    """A run killed between its commit and removing its work dir leaves checkpoints nobody
    resumes: the next run removes them; a work dir of a key not stored (resumable) stays."""
    store = Store(tmp_path)
    with store.write("c" * 20, kind="checkpoint", stage="s", stage_version=1, config={},
                     parent=None) as pending:  # fmt: skip
        (pending.dir / "f").write_text("x")
    (store.work_dir("c" * 20) / "checkpoint-4").mkdir(parents=True)
    (store.work_dir("d" * 20) / "checkpoint-4").mkdir(parents=True)
    assert store.clean_tmp() == 1
    assert [d.name for d in (tmp_path / "work").iterdir()] == ["d" * 20]
