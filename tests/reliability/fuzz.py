"""Seeded mutations for the fuzzing campaign (test_fuzz.py), and the check every case must pass.

A case is an input damaged one way (bytes truncated or bit-flipped; a JSON or TOML document with a
key deleted, a value of the wrong type, an unknown key, an out-of-range number, a path that climbs
out of its folder, a huge value), then one `accel` command run on it in this process. It must end
in a result or a clear error: exit code 0, 1 or 2 (README, "Exit codes"), no traceback, an error
message that names the problem, no output file and no half-written artifact after an error."""

from __future__ import annotations

import io
import json
import math
import re
import sys
import traceback
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

from accel.core.artifact import Artifact

from test_cli import snapshot  # the files under a root: a failed command leaves none

EXIT_CODES = {0, 1, 2}  # 0: done; 1: an error in the input, files or machine; 2: a usage error
FILES, USAGE = (
    {0, 1},
    {0, 2},
)  # damaged files (weights, engines, bundles); recipes, targets, prompts
WRONG_TYPES = [None, True, "x", 7, -1.5, [], {}, [1, "a"], {"k": 1}]
OUT_OF_RANGE = [-1, 0, -(2**63), 2**64, 1e308, -1e308, math.inf, -math.inf, math.nan, 0.5]
PATHS = ["../escape", "../../../etc/passwd", "/etc/passwd", "a/../../b", "..\\x", "C:\\x", ""]


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def bitflip(data: bytes, rng: np.random.Generator, within: int | None = None) -> bytes:
    """1 to 8 random bits flipped, in the first ``within`` bytes (a header) or anywhere."""
    out = bytearray(data)
    span = min(within or len(out), len(out))
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(0, span))
        out[i] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def damage_bytes(data: bytes, rng: np.random.Generator, header: int = 256) -> tuple[str, bytes]:
    how = ["truncated", "bits flipped in the header", "bits flipped"][int(rng.integers(0, 3))]
    if how == "truncated":
        return how, truncate(data, rng)
    return how, bitflip(data, rng, header if how.endswith("header") else None)


def _slots(obj, path=()):
    """Every (container, key) in a JSON-like document, depth first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in list(items):
        yield obj, k, path + (k,)
        if isinstance(v, dict | list):
            yield from _slots(v, path + (k,))


def damage_document(doc, rng: np.random.Generator) -> tuple[str, object]:
    """One structural mutation of a JSON or TOML document (a copy): what was done, the result."""
    doc = json.loads(json.dumps(doc))
    slots = list(_slots(doc))
    dicts = [doc] + [c[k] for c, k, _ in slots if isinstance(c[k], dict)]
    ops = ["delete", "wrong type", "unknown key", "out of range", "path", "huge"]
    op = ops[int(rng.integers(0, len(ops)))]
    pick = lambda seq: seq[int(rng.integers(0, len(seq)))]  # noqa: E731
    if op == "unknown key" or not slots:
        target = pick(dicts)
        target[f"unexpected_{int(rng.integers(0, 100))}"] = pick(WRONG_TYPES[1:])
        return "unknown key", doc
    if op == "out of range":
        numbers = [s for s in slots if isinstance(s[0][s[1]], int | float)]
        if numbers:
            c, k, p = pick(numbers)
            c[k] = pick(OUT_OF_RANGE)
            return f"{'.'.join(map(str, p))} out of range ({c[k]!r})", doc
        op = "wrong type"
    if op in ("path", "huge"):
        strings = [s for s in slots if isinstance(s[0][s[1]], str)]
        if strings:
            c, k, p = pick(strings)
            c[k] = pick(PATHS) if op == "path" else "x" * 1_000_000
            return f"{'.'.join(map(str, p))} {'a path out' if op == 'path' else 'huge'}", doc
        op = "wrong type"
    c, k, p = pick(slots)
    where = ".".join(map(str, p))
    if op == "delete":
        del c[k]
        return f"{where} deleted", doc
    choices = [v for v in WRONG_TYPES if type(v) is not type(c[k])]
    c[k] = pick(choices)
    return f"{where} of the wrong type ({type(c[k]).__name__})", doc


def toml_dumps(doc: dict) -> str:
    """A TOML document of inline values (None values are left out: TOML has no null)."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return (
                "nan"
                if math.isnan(v)
                else ("inf" if v > 0 else "-inf")
                if math.isinf(v)
                else repr(v)
            )
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
        return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()
                               if x is not None) + "}"  # fmt: skip

    return "".join(f"{json.dumps(k)} = {value(v)}\n" for k, v in doc.items() if v is not None)


def accel(*args) -> tuple[int | None, str, str]:
    """`accel ARGS` in this process: (exit code, stdout, stderr); exit code None and the
    traceback in stderr when it raised anything but SystemExit (a bug)."""
    from accel.cli import main

    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = ["accel", *map(str, args)]
    code: int | None
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 (a bug: kept for the report)
        code = None
        err.write(traceback.format_exc())
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


class Campaign:
    """The tally of one row: cases, results, errors by exit code, and the messages seen."""

    def __init__(self, name: str):
        self.name, self.results, self.messages = name, Counter(), Counter()

    def run(self, case: str, args: list, store: Path | None = None, out: Path | None = None,
            check_result=None, codes: set[int] = EXIT_CODES) -> int:  # fmt: skip
        """Run one case; assert it ends in a result or a clear error with one of ``codes`` (the
        documented exit code of that kind of input). Its exit code."""
        before = snapshot(store) if store else None
        code, stdout, stderr = accel(*args)
        self.last = stderr
        tell = f"{self.name} case {case!r:.200}: accel {' '.join(map(str, args))[:300]}\n{stderr[-3000:]}"
        assert code is not None and "Traceback" not in stderr, tell
        assert code in codes, tell
        if code == 0:
            if check_result is not None:
                check_result(out)
            if store is not None:  # what it added is complete: every hash verifies, no temp dir
                for artifact in (store / "artifacts").glob("*"):
                    Artifact.load(artifact).verify()
                assert not any((store / "tmp").glob("*")), tell
            self.results["result"] += 1
        else:
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            message = next((line for line in lines if line.startswith(("error:", "Error:"))), None)
            assert message is not None and len(message) > 20, tell  # names the problem
            if out is not None:
                assert not out.exists(), tell
            if store is not None:  # nothing half-written: the store is as it was
                assert snapshot(store) == before, tell
            self.error(code, " | ".join(lines[lines.index(message) :]))
        return code

    def error(self, code: int, message: str) -> None:
        """Count an error, by exit code and by message (paths and numbers masked)."""
        self.results[f"exit {code}"] += 1
        masked = re.sub(r"\d+", "N", re.sub(r"(/[^\s:,'\"]+)+", "PATH", message))
        self.messages[masked[:160]] += 1

    def figures(self) -> dict:
        return {
            "cases": sum(self.results.values()),
            "outcomes": dict(self.results),
            "distinct_messages": len(self.messages),
            "messages": dict(self.messages.most_common(6)),
        }


def finite_images(out: Path) -> None:
    """A result: every image finite and in [0, 1]."""
    images = np.load(out)["images"]
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
