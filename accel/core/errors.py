"""The user-facing error family. The CLI prints these without a traceback and exits non-zero;
any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class AccelError(Exception):
    """Base of every error caused by the user's input, files or machine."""

    exit_code = 1


class RecipeError(AccelError):
    """A recipe (or a stage config) is malformed, names unknown keys, or chains stages wrongly."""

    exit_code = 2


class CheckpointError(AccelError):
    """A checkpoint, ONNX graph or engine is missing, corrupt, or holds NaN/Inf weights."""


class TargetError(AccelError):
    """A target profile is unknown or its TOML file is invalid (a usage error, like a recipe's)."""

    exit_code = 2


class TargetMismatch(AccelError):
    """An artifact was built for another hardware target than the one asked for."""


class StageError(AccelError):
    """A stage failed. Names the failed stage and the stages that completed before it."""

    def __init__(self, stage: str, message: str, completed: list[str] | None = None):
        super().__init__(message)
        self.stage, self.message = stage, message
        self.completed = list(completed or [])  # the runner fills this in

    def __str__(self) -> str:
        done = ", ".join(self.completed) if self.completed else "none"
        return f"stage {self.stage!r} failed: {self.message} (completed stages: {done})"


class ReportError(AccelError):
    """A profile report that is missing, not JSON, or not of the accel.report/2 schema. Exit
    code 2, so that CI tells a bad input from `accel report compare`'s regression (1)."""

    exit_code = 2


def inside(rel: object) -> bool:
    """Whether ``rel`` names a path inside the directory it is relative to: a non-empty relative
    POSIX path without ``..`` parts (a manifest's or a plan's file names; ``../`` in one must not
    read or write outside the artifact)."""
    from pathlib import PurePosixPath, PureWindowsPath

    if not isinstance(rel, str) or not rel or "\\" in rel or PureWindowsPath(rel).drive:
        return False
    path = PurePosixPath(rel)
    return not path.is_absolute() and ".." not in path.parts
