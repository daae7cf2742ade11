"""Artifacts and their content-addressed store.

Every stage output is a directory with a `manifest.json`. Writes go to a temporary directory, the
manifest is written last, then one atomic rename: a directory without a manifest does not exist,
so an interrupted run never leaves a half-written artifact that a rerun would trust."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from accel.core.errors import CheckpointError, inside

MANIFEST = "manifest.json"
KINDS = ("checkpoint", "onnx", "engine", "report", "bundle")


def canonical_json(obj: Any) -> str:
    """One spelling per value, so equal configs hash equally whatever their key order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def artifact_key(
    stage: str,
    version: int,
    config: dict,
    parent: str | None,
    target_fingerprint: str | None = None,
) -> str:
    """The cache key: anything that can change a stage's output is in it, nothing else."""
    fields = {
        "stage": stage,
        "version": version,
        "config": config,
        "parent": parent,
        "target": target_fingerprint,
    }
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()[:20]


def _is_key(name: str) -> bool:
    return len(name) == 20 and all(c in "0123456789abcdef" for c in name)


def sha256_file(path: str | Path) -> str:
    """Streamed, so multi-GB weights never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root by relative posix path, the top-level manifest excluded."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        version = dist_version("accel")
    except PackageNotFoundError:
        version = "unknown"
    return {"accel": version, "python": platform.python_version()}


@dataclass
class Artifact:
    """A committed artifact directory and its manifest."""

    path: Path
    manifest: dict

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"artifact directory not found: {path}")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise CheckpointError(
                f"{path} has no {MANIFEST}, so it is an unfinished write; "
                f"delete the directory {path} and rerun"
            )
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(
                f"{manifest_path} is not valid JSON ({e}); delete the artifact directory "
                f"{path} and rerun"
            ) from None
        required = {"key": str, "kind": str, "stage": str, "files": dict}
        if not isinstance(manifest, dict) or any(
            not isinstance(manifest.get(k), t) for k, t in required.items()
        ):
            raise CheckpointError(
                f"{manifest_path} is not an accel manifest (it needs {', '.join(required)}); "
                f"delete the artifact directory {path} and rerun"
            )
        outside = [f for f in manifest["files"] if not inside(f)]
        if outside:
            raise CheckpointError(
                f"{manifest_path} lists files outside its directory ({outside[0]!r}); it was not "
                "written by accel: do not use it"
            )
        return cls(path, manifest)

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def stage(self) -> str:
        return self.manifest["stage"]

    @property
    def parent(self) -> str | None:
        return self.manifest.get("parent")

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def target(self) -> dict | None:
        return self.manifest.get("target")

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def info(self) -> dict:
        return self.manifest.get("info", {})

    @property
    def files(self) -> dict[str, str]:
        return self.manifest["files"]

    def verify(self) -> None:
        """Re-hash every listed file: a cached artifact edited by hand must not be trusted."""
        for rel, digest in self.files.items():
            p = self.path / rel
            if not p.is_file():
                raise CheckpointError(
                    f"file {rel} of artifact {self.path.name} is missing; delete the artifact "
                    f"directory {self.path} and rerun"
                )
            if sha256_file(p) != digest:
                raise CheckpointError(
                    f"file {rel} of artifact {self.path.name} was modified after it was written; "
                    f"delete the artifact directory {self.path} and rerun"
                )


@dataclass
class Pending:
    """An artifact being written: the stage fills `dir`, `metrics` and `info`."""

    dir: Path
    metrics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    artifact: Artifact | None = None  # set once the write has committed


class Store:
    """Artifacts at root/artifacts/<key>; temp dirs at root/tmp, on the same filesystem so the
    final rename is atomic; work dirs of unfinished stages (training checkpoints) at
    root/work/<key>, kept after a failure so the stage can resume."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()  # stages may change the working directory
        self.artifacts = self.root / "artifacts"
        self.tmp = self.root / "tmp"

    def path(self, key: str) -> Path:
        return self.artifacts / key

    def work_dir(self, key: str) -> Path:
        return self.root / "work" / key

    def has(self, key: str) -> bool:
        return (self.path(key) / MANIFEST).is_file()

    def get(self, key: str) -> Artifact:
        if not self.has(key):
            raise CheckpointError(f"artifact {key} is not in the store at {self.root}")
        artifact = Artifact.load(self.path(key))
        if artifact.manifest.get("key") != key:
            raise CheckpointError(
                f"{self.path(key)} holds a manifest for key {artifact.manifest.get('key')!r}, "
                f"not {key!r}; delete that directory and rerun"
            )
        return artifact

    def lineage(self, artifact: Artifact) -> list[Artifact]:
        """The artifact, then its parent, grandparent, ... as far as the store holds them."""
        chain = [artifact]
        while (parent := chain[-1].parent) and self.has(parent) and len(chain) <= 1000:
            chain.append(self.get(parent))
        return chain

    @contextmanager
    def write(
        self,
        key: str,
        *,
        kind: str,
        stage: str,
        stage_version: int,
        config: dict,
        parent: str | None,
        target: dict | None = None,
    ) -> Iterator[Pending]:
        """Yield a Pending to fill; commit on normal exit, leave no trace on any exception."""
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}; expected one of {KINDS}")
        self.tmp.mkdir(parents=True, exist_ok=True)
        pending = Pending(Path(tempfile.mkdtemp(prefix=f"{key}.", dir=self.tmp)))
        try:
            yield pending
            manifest = {
                "key": key,
                "kind": kind,
                "stage": stage,
                "stage_version": stage_version,
                "config": config,
                "parent": parent,
                "target": target,
                "files": hash_tree(pending.dir),
                "metrics": pending.metrics,
                "info": pending.info,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "tool_versions": _tool_versions(),
            }
            (pending.dir / MANIFEST).write_text(
                json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8"
            )
            self._commit(key, pending.dir)
            pending.artifact = self.get(key)
        finally:
            # After a commit the temp dir has been renamed away (or lost a race): nothing to remove.
            shutil.rmtree(pending.dir, ignore_errors=True)

    def _commit(self, key: str, tmp_dir: Path) -> None:
        """One rename publishes the artifact. rename() refuses a non-empty target directory, so a
        concurrent writer's committed artifact is never replaced or deleted."""
        final = self.path(key)
        self.artifacts.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                os.rename(tmp_dir, final)
                return
            except OSError:
                if self.has(key):  # an earlier or concurrent writer got there first: keep theirs
                    return
            # A manifest-less leftover (a killed delete, a hand-made dir) is not an artifact:
            # move it into tmp/ with one rename, then retry.
            trash = Path(tempfile.mkdtemp(prefix="leftover.", dir=self.tmp))
            with contextlib.suppress(FileNotFoundError):
                os.rename(final, trash / key)
            shutil.rmtree(trash, ignore_errors=True)
        raise CheckpointError(f"cannot publish artifact {key} at {final}; remove that directory")

    @contextmanager
    def claim(self, key: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the exclusive right to compute ``key`` (an ``flock`` on ``locks/<key>.lock``) while
        inside, so that concurrent runs of overlapping recipes compute each stage once. Another
        process's claim is waited for, after ``on_wait`` is told who holds it; the kernel drops
        a claim when its process dies, so a crash leaves no stale lock (its file may stay: the
        next claim takes it over), and a finished claim removes its file. Without ``fcntl``
        (Windows) there is no claim: the atomic rename still keeps one artifact per key."""
        with self._claim(key, on_wait, wait=True):
            yield

    @contextmanager
    def _claim(self, key: str, on_wait: Callable[[str], None] | None, wait: bool) -> Iterator[bool]:
        """``claim``, yielding whether it is held; without ``wait``, False at once when another
        process holds it."""
        try:
            import fcntl
        except ImportError:
            yield True
            return
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        path = locks / f"{key}.lock"
        while True:
            f = open(path, "a+")  # noqa: SIM115 (held across the yield below)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    f.close()
                    yield False
                    return
                f.seek(0)
                if on_wait is not None:
                    on_wait(f.read().strip() or "another process")
                fcntl.flock(f, fcntl.LOCK_EX)
            try:  # the holder we waited for removed the file: claim a fresh one
                if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {platform.node()}")
            f.flush()
            yield True
        finally:  # unlinked while held, so no run leaves a lock file behind
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    def clean_tmp(self, older_than_s: float = 24 * 3600) -> int:
        """Remove temp dirs left by killed processes. A writer's temp dir is named after its key
        and written under that key's claim, so one whose claim is free belongs to no live process
        and goes at once (a killed run leaves nothing a rerun keeps); others (scratch dirs) go
        when older than ``older_than_s``. So does the work dir (training checkpoints) of a key
        that is stored: its run was killed between the commit and the work dir's removal."""
        removed = 0
        work = self.root / "work"
        for d in list(work.iterdir()) if work.is_dir() else []:
            if _is_key(d.name) and self.has(d.name):
                removed += self._remove_unclaimed(d.name, d)
        if not self.tmp.is_dir():
            return removed
        cutoff = time.time() - older_than_s
        for d in list(self.tmp.iterdir()):
            key = d.name.partition(".")[0]
            if not d.is_dir():
                continue
            if _is_key(key):
                removed += self._remove_unclaimed(key, d)
            elif d.stat().st_mtime < cutoff:
                shutil.rmtree(d, ignore_errors=True)
                removed += 1
        return removed

    def _remove_unclaimed(self, key: str, path: Path) -> bool:
        """Remove ``path`` unless a live process holds ``key``'s claim; whether it did."""
        with self._claim(key, None, wait=False) as free:
            if free:
                shutil.rmtree(path, ignore_errors=True)
            return free

    def source(self, src_dir: str | Path) -> Artifact:
        """A user's diffusers directory as a checkpoint artifact, keyed by its content (so moving
        the directory keeps the cache). Nothing is written: the store keeps a copy only once a
        stage built from it succeeds (``add_source``), so bad input leaves the store unchanged."""
        src = Path(src_dir).expanduser()
        if not src.is_dir():
            raise CheckpointError(
                f"source checkpoint not found: {src}; point the recipe's 'source' at a diffusers "
                "directory (config.json + safetensors, or a pipeline with model_index.json)"
            )
        config = {"files": hash_tree(src)}
        key = artifact_key("source", 1, config, None)
        if self.has(key):
            return self.get(key)
        return Artifact(
            src,
            {
                "key": key,
                "kind": "checkpoint",
                "stage": "source",
                "stage_version": 1,
                "config": config,
                "parent": None,
                "files": config["files"],
                "metrics": {},
                "info": {"source_path": str(src.resolve())},
            },
        )

    def add_source(self, src_dir: str | Path) -> Artifact:
        """Copy a source checkpoint into the store (once), returning the stored artifact."""
        unstored = self.source(src_dir)
        with self.claim(unstored.key):  # its temp dir is then never taken for a dead run's
            if self.has(unstored.key):
                return self.get(unstored.key)
            with self.write(
                unstored.key,
                kind="checkpoint",
                stage="source",
                stage_version=1,
                config=unstored.config,
                parent=None,
            ) as pending:
                shutil.copytree(unstored.path, pending.dir, dirs_exist_ok=True)
                pending.info.update(unstored.info)
        return self.get(unstored.key)
