"""Peak memory per stage (``accel.core.memory``): the high-water mark is reset where the work
starts, so a stage's figure is its own, not the process's largest so far."""

import numpy as np

from accel.core.memory import PeakMemory


def _touch(mb: int) -> int:
    block = np.ones(mb * 2**20, dtype=np.uint8)  # written, so resident
    return int(block[::4096].sum())


def test_the_peak_is_the_works_own():
    with PeakMemory() as big:
        _touch(400)
    with PeakMemory() as small:
        _touch(40)
    a, b = big.metrics(), small.metrics()
    assert a["peak_rss_mb"] >= 400
    if "peak_rss_since" not in b:  # the mark was reset (Linux): the second figure is its own
        assert b["peak_rss_mb"] < a["peak_rss_mb"] - 300


def test_every_stage_records_its_peak(tmp_path):
    from accel.pipeline import default_store

    from tiny import build, write_tiny_pipeline

    store = default_store(tmp_path / "store")
    source = store.source(write_tiny_pipeline(tmp_path / "teacher"))
    graph = build(store, source, "onnx", num_inference_steps=2)
    assert graph.metrics["peak_rss_mb"] > 50 and graph.metrics["wall_seconds"] >= 0


def test_allocators_sizes_are_read():
    from accel.core.memory import asked_bytes

    torch_cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory: "
        "you tried to allocate 2147483648 bytes."
    )
    torch_cuda = RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB (GPU 0; 79.1 GiB)")
    ort = RuntimeError("Failed to allocate memory for requested buffer of size 1048576")
    assert asked_bytes(torch_cpu) == 2**31
    assert asked_bytes(torch_cuda) == int(1.5 * 2**30)
    assert asked_bytes(ort) == 2**20
    assert asked_bytes(MemoryError()) is None


def test_a_stage_out_of_memory_is_one_line_that_says_what_to_try(tmp_path, monkeypatch, capsys):
    """The allocator's error inside a stage: one line naming the stage, the size asked for, the
    peak against the machine's memory and what to try (LoRA first); no traceback, nothing in
    the store."""
    import distill.consistency
    from accel.core.memory import STAGE_FILE_ENV

    from tiny import run_cli, write_tiny_pipeline

    teacher = write_tiny_pipeline(tmp_path / "teacher")

    def too_big(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory: "
            "you tried to allocate 12884901888 bytes."
        )

    monkeypatch.setattr(distill.consistency, "distill", too_big)
    noted = tmp_path / "stage"  # what a watched run's parent reads if the kernel kills it
    monkeypatch.setenv(STAGE_FILE_ENV, str(noted))
    code, out, err = run_cli(
        monkeypatch, capsys, "distill", "consistency", teacher, "--iterations", 2,
        "--batch-size", 8, "--store", tmp_path / "store", "--out", tmp_path / "student",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "out of memory in the consistency stage" in line
    assert "an allocation of 12.0 GB failed" in line and "resident of this machine's" in line
    assert "lora_rank" in line and "gradient_checkpointing" in line and "batch_size (now 8)" in line
    assert not (tmp_path / "student").exists()
    stage, tries = noted.read_text().splitlines()
    assert stage == "consistency" and tries.startswith("try a LoRA student") and tries in line
    assert not list((tmp_path / "store" / "artifacts").glob("*/manifest.json"))[1:]  # the source


def _watched(monkeypatch, capfd, run):
    """``accel.cli.console`` with ``main`` replaced by ``run``: (exit code, stderr)."""
    import pytest

    import accel.cli

    monkeypatch.setattr(accel.cli, "main", run)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        accel.cli.console()
    return exit_.value.code, capfd.readouterr().err


def test_a_run_the_kernel_kills_is_one_line_and_leaves_no_scratch(monkeypatch, capfd, tmp_path):
    """The kernel's out-of-memory killer sends SIGKILL, which the run cannot catch: the watching
    parent names the stage and the peak, and removes the run's scratch directory (TMPDIR)."""
    import os
    import signal
    import tempfile

    from accel.core.memory import note_stage

    seen = tmp_path / "tmpdir"

    def killed():
        note_stage("quantize", "try a smaller [shapes] batch max in the target")
        seen.write_text(tempfile.gettempdir())
        (tempfile.mkdtemp(prefix="ort.quant.") + "/x") and _touch(100)
        os.kill(os.getpid(), signal.SIGKILL)

    code, err = _watched(monkeypatch, capfd, killed)
    assert code == 128 + signal.SIGKILL
    (line,) = err.strip().splitlines()
    assert line.startswith("error: the quantize stage was killed by the kernel (SIGKILL)")
    assert "out of memory, most likely" in line and line.endswith(
        "try a smaller [shapes] batch max in the target"
    )
    scratch = seen.read_text()
    assert scratch != tempfile.gettempdir() and not os.path.exists(scratch)


def test_a_watched_run_exits_with_its_own_code(monkeypatch, capfd):
    import sys

    def fails():
        print("error: something else", file=sys.stderr)
        sys.exit(3)

    code, err = _watched(monkeypatch, capfd, fails)
    assert code == 3 and err.strip() == "error: something else"
    code, err = _watched(monkeypatch, capfd, lambda: None)
    assert code == 0 and err == ""
