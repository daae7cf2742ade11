"""A recipe end to end on a tiny teacher: every stage runs once, a rerun is all cache hits, and a
failing stage names itself and the stages that completed."""

from pathlib import Path

import pytest

from accel.core.errors import StageError, TargetMismatch
from accel.core.target import load_target, profiles_dir
from accel.pipeline import default_store, plan, run_recipe
from accel.recipe import load_recipe
from accel.report import load_report
from accel.runtime import open_engine

from tiny import write_tiny_pipeline

STAGES = """
[[stages]]
stage = "progressive"
teacher_steps = 4
student_steps = 2
guidance_scale = 2.0
iterations_per_round = 4
batch_size = 8

[[stages]]
stage = "onnx"

[[stages]]
stage = "ort"
{ort_extra}

[[stages]]
stage = "profile"
teacher_steps = 6
quality_samples = 20
quality_seeds = [0]
scenarios = ["single_stream", "offline"]
warmup_iterations = 1
warmup_ms = 0
iterations = 3
breakdown_repeats = 2
"""


def recipe(tmp_path, ort_extra=""):
    teacher = tmp_path / "teacher"
    if not teacher.exists():
        write_tiny_pipeline(teacher)
    path = tmp_path / f"r{len(ort_extra)}.toml"
    path.write_text(
        'name = "tiny"\nsource = "teacher"\ntarget = "cpu"\n' + STAGES.format(ort_extra=ort_extra)
    )
    return load_recipe(path)


def test_recipe_runs_then_hits_the_cache_then_fails_cleanly(tmp_path):
    store = default_store(tmp_path / "store")
    messages = []
    artifacts = run_recipe(recipe(tmp_path), store, progress=messages.append)
    assert [a.stage for a in artifacts] == ["progressive", "onnx", "ort", "profile"]
    assert [a.kind for a in artifacts] == ["checkpoint", "onnx", "engine", "report"]
    engine, report_dir = artifacts[2], artifacts[3]
    assert engine.target["name"] == "cpu"
    report = load_report(report_dir.path)  # validated against the schema
    assert report["speedup_end_to_end_p50"] > 0
    workloads = [
        "teacher eager, 6 steps, cfg",
        "student eager, 2 steps",
        "student engine (onnxruntime:CPUExecutionProvider), 2 steps",
    ]
    for scenario in report["scenarios"].values():
        assert list(scenario["results"]) == workloads
        for r in scenario["results"].values():
            s = r["latency_ms"]
            assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"] and s["n"] == 3
    assert report["scenarios"]["offline"]["batch"] == 64
    assert set(report["quality"]) == {workloads[0], "teacher DDIM, 2 steps", workloads[2]}
    assert "quality_latency.png" in report["plots"]
    # what each stage of the chain cost, the source first: its own peak memory from its manifest
    chain = report["chain"]
    assert [r["stage"] for r in chain] == ["source", "progressive", "onnx", "ort"]
    assert all(r["peak_rss_mb"] > 0 and r["wall_seconds"] >= 0 for r in chain[1:])
    markdown = (report_dir.path / "report.md").read_text()
    assert (
        markdown.startswith("# accel report") and "## The chain: what each stage cost" in markdown
    )
    assert any(p.suffix == ".png" for p in report_dir.path.iterdir())
    for a in artifacts:
        a.verify()

    other = tmp_path / "other.toml"
    other.write_text(Path(profiles_dir() / "cpu.toml").read_text().replace("max = 64", "max = 32"))
    with pytest.raises(TargetMismatch, match="was built for target 'cpu'"):
        open_engine(engine.path, load_target(str(other)))
    runtime, plan_ = open_engine(engine.path, load_target("cpu"))
    assert len(plan_.steps) == 2 and "class_labels" in runtime.inputs()

    _, stages = plan(recipe(tmp_path), store)
    assert all(s.hit for s in stages)
    again = []
    assert [a.key for a in run_recipe(recipe(tmp_path), store, progress=again.append)] == [
        a.key for a in artifacts
    ]
    assert all("cache hit" in m for m in again)

    before = sorted(p.name for p in store.artifacts.iterdir())
    with pytest.raises(StageError) as exc:
        run_recipe(recipe(tmp_path, 'provider = "CUDAExecutionProvider"'), store, progress=print)
    assert "stage 'ort' failed" in str(exc.value)
    assert "completed stages: progressive, onnx" in str(exc.value)
    assert sorted(p.name for p in store.artifacts.iterdir()) == before


def test_shipped_recipes_load():
    """Every recipe in accel/recipes names real stages with valid configs and an existing source."""
    from pathlib import Path

    import accel
    from accel.recipe import load_recipe

    paths = sorted((Path(accel.__file__).parent / "recipes").glob("*.toml"))
    assert {p.stem for p in paths} >= {"digits-pixel", "text-digits"}
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.stages
