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
