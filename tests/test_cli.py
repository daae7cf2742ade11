"""The CLI: --help is fast and torch-free; user errors are one message, a non-zero exit, no
traceback, and leave the store as it was."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny import run_cli, write_tiny_pipeline

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def snapshot(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_help_does_not_import_torch():
    code = (
        "import sys, accel, accel.cli; from click.testing import CliRunner; "
        "r = CliRunner().invoke(accel.cli.cli, ['--help']); assert r.exit_code == 0, r.output; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "command",
    [
        ["distill", "progressive"],
        ["export", "onnx"],
        ["export", "optimize"],
        ["export", "fp16"],
        ["quantize"],
        ["compile"],
        ["profile"],
        ["run"],
        ["plan"],
        ["demo"],
        ["sample"],
        ["inspect"],
        ["targets"],
        ["targets", "show"],
        ["targets", "detect"],
        ["report", "compare"],
        ["bundle"],
        ["deploy", "triton"],
    ],
)
def test_every_command_has_help(monkeypatch, capsys, command):
    code, out, _ = run_cli(monkeypatch, capsys, *command, "--help")
    assert code == 0 and "Usage:" in out


def expect_user_error(monkeypatch, capsys, store, *args, match):
    before = snapshot(store)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--store", store)
    assert code != 0
    assert match in err, err
    assert "Traceback" not in err
    assert snapshot(store) == before
    return err


def test_missing_input(monkeypatch, capsys, tmp_path):
    expect_user_error(
        monkeypatch,
        capsys,
        tmp_path / "store",
        "distill",
        "progressive",
        tmp_path / "nope",
        match="not found",
    )


def test_corrupt_safetensors(monkeypatch, capsys, tmp_path):
    model = write_tiny_pipeline(tmp_path / "model")
    data = (model / WEIGHTS).read_bytes()
    (model / WEIGHTS).write_bytes(data[: len(data) // 2])
    expect_user_error(
        monkeypatch,
        capsys,
        tmp_path / "store",
        "export",
        "onnx",
        model,
        "--num-inference-steps",
        "2",
        match="not a readable safetensors file",
    )


def test_nan_weights(monkeypatch, capsys, tmp_path):
    model = write_tiny_pipeline(tmp_path / "model")
    tensors = load_file(str(model / WEIGHTS))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name][0] = float("nan")
    save_file(tensors, str(model / WEIGHTS))
    expect_user_error(
        monkeypatch,
        capsys,
        tmp_path / "store",
        "distill",
        "progressive",
        model,
        match=f"NaN or Inf weights in {name}",
    )


def test_unknown_recipe_key(monkeypatch, capsys, tmp_path):
    model = write_tiny_pipeline(tmp_path / "model")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'name = "r"\nsource = "{model}"\ntarget = "cpu"\n'
        '[[stages]]\nstage = "progressive"\nguidance_scal = 2.0\n'
    )
    err = expect_user_error(
        monkeypatch,
        capsys,
        tmp_path / "store",
        "run",
        recipe,
        match="did you mean 'guidance_scale'?",
    )
    assert "stages[0]" in err


def test_unknown_stage_option(monkeypatch, capsys, tmp_path):
    model = write_tiny_pipeline(tmp_path / "model")
    expect_user_error(
        monkeypatch,
        capsys,
        tmp_path / "store",
        "distill",
        "progressive",
        model,
        "--student-steps",
        "3",
        match="power of two",
    )


def test_sample_writes_npz_and_refuses_bad_steps(monkeypatch, capsys, tmp_path):
    model = write_tiny_pipeline(tmp_path / "model")
    out = tmp_path / "s.npz"
    code, stdout, err = run_cli(
        monkeypatch,
        capsys,
        "sample",
        model,
        "-n",
        12,
        "--steps",
        3,
        "--guidance",
        1.5,
        "--out",
        out,
    )
    assert code == 0, err
    data = np.load(out)
    assert data["images"].shape == (12, 1, 16, 16) and data["images"].dtype == np.float32
    assert data["images"].min() >= 0 and data["images"].max() <= 1
    assert data["labels"].dtype == np.int64 and data["labels"].tolist() == [
        i % 10 for i in range(12)
    ]
    assert torch.isfinite(torch.from_numpy(data["images"])).all()


def test_epsilon_teacher_is_refused_by_progressive(monkeypatch, capsys, tmp_path):
    from accel.core.model_info import ModelInfo
    from distill.checkpoint import save_pipeline

    from tiny import SCHEDULER, tiny_unet

    model = tmp_path / "eps"
    save_pipeline(
        model,
        tiny_unet(),
        dict(SCHEDULER, prediction_type="epsilon"),
        ModelInfo(null_class_label=10, num_classes=10),
    )
    expect_user_error(
        monkeypatch,
        capsys,
        tmp_path / "store",
        "distill",
        "progressive",
        model,
        "--iterations-per-round",
        "1",
        match="the teacher predicts epsilon",
    )


def test_quantize_and_compile_refuse_bad_input_with_one_line(monkeypatch, capsys, tmp_path):
    model = write_tiny_pipeline(tmp_path / "model")
    store, graph = tmp_path / "store", tmp_path / "graph"
    code, _, err = run_cli(
        monkeypatch, capsys, "export", "onnx", model, "--num-inference-steps", 2,
        "--out", graph, "--store", store,
    )  # fmt: skip
    assert code == 0, err
    expect_user_error(
        monkeypatch, capsys, store, "quantize", graph, "--opset", 19,
        match="--opset do not apply to stage 'quantize'",
    )  # fmt: skip
    expect_user_error(
        monkeypatch, capsys, store, "quantize", graph, "--method", "int4",
        match="'--method'",
    )  # fmt: skip
    expect_user_error(
        monkeypatch, capsys, store, "compile", model, "--backend", "ort",
        match="compile (ort) takes a onnx, but",
    )  # fmt: skip
    err = expect_user_error(
        monkeypatch, capsys, store, "quantize", graph, "--calibration-samples", 2,
        "--gate", '{ metric = "image_rmse", threshold = 0.0, samples = 4 }',
        match="quality gate failed: image RMS difference",
    )  # fmt: skip
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [err.splitlines()[-1]]


def test_targets_list_show_and_detect(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "targets", "list")
    assert code == 0 and "h100-sxm" in out and "H100 80GB HBM3, sm_90" in out
    code, out, _ = run_cli(monkeypatch, capsys, "targets", "show", "l4")
    assert code == 0 and '"compute_capability": "8.9"' in out
    assert "--minShapes=sample:1x4x16x16 --optShapes=sample:8x4x16x16" in out
    code, out, _ = run_cli(monkeypatch, capsys, "targets", "detect")
    from accel.core.target import list_targets

    assert code == 0 and out.split()[0] in list_targets() and "(" in out  # a target, and why
    from accel.core.hardware import cpu_info, gpu_info

    flags = set(cpu_info()["flags"])
    if not gpu_info() and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
        assert out.startswith("cpu-avx512  (CPU ")


def test_profile_command_writes_a_report_and_refuses_a_foreign_engine(
    monkeypatch, capsys, tmp_path
):
    model = write_tiny_pipeline(tmp_path / "model")
    store, graph, engine = tmp_path / "store", tmp_path / "graph", tmp_path / "engine"
    for args in (
        ("export", "onnx", model, "--num-inference-steps", 2, "--out", graph),
        ("compile", graph, "--out", engine, "--gate", '{ metric = "off" }'),
    ):
        code, _, err = run_cli(monkeypatch, capsys, *args, "--store", store)
        assert code == 0, err
    out = tmp_path / "report"
    code, stdout, err = run_cli(
        monkeypatch, capsys, "profile", model, engine, "--target", "cpu",
        "--iterations", 3, "--warmup-ms", 0, "--scenario", "single_stream", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert {"report.json", "report.md", "latency.png", "breakdown.png"} <= {
        p.name for p in out.iterdir()
    }
    assert "| model (torch-eager, 50 steps) |" in stdout
    assert "| engine (onnxruntime:CPUExecutionProvider, 2 steps) |" in stdout
    assert "Pairwise" in stdout
    code, _, err = run_cli(
        monkeypatch, capsys, "profile", engine, "--quality-samples", 5, "--out", out
    )
    assert code != 0 and "at least 10" in err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "profile", engine, "--out", busy)
    assert code != 0 and "holds files and no report.json" in err
    assert (busy / "keep.txt").read_text() == "mine"
    foreign = tmp_path / "foreign"
    code, _, err = run_cli(
        monkeypatch, capsys, "profile", engine, "--target", "cpu-avx512", "--out", foreign
    )
    assert code != 0 and "was built for target 'cpu'" in err and "Traceback" not in err
    assert not foreign.exists()


def _commands(group, path=()):
    """Every command under ``group`` with its path of names."""
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_option_has_a_help_line_and_stage_options_their_type(monkeypatch, capsys, tmp_path):
    """Each option of every command says what it is; an option made from a stage config's
    field that is a number, a Literal or a bool has that click type (never TEXT), and a wrong
    value is click's usage error naming the option."""
    import types
    import typing

    import click

    from accel.cli import StageCommand, cli
    from accel.registry import get_stage

    ctx = click.Context(cli)
    checked = 0
    for path, command in _commands(cli):
        for param in command.get_params(ctx):
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"accel {' '.join(path)} {param.opts[0]} has no help"
        if not isinstance(command, StageCommand):
            continue
        options = {p.name: p for p in command.get_params(ctx)}
        for stage in command.stages.values():
            for field, info in get_stage(stage).config.model_fields.items():
                kinds = {info.annotation}
                if typing.get_origin(info.annotation) in (typing.Union, types.UnionType):
                    kinds = set(typing.get_args(info.annotation)) - {type(None)}
                scalar = all(k in (int, float, bool) or typing.get_origin(k) is typing.Literal
                             for k in kinds)  # fmt: skip
                if scalar:
                    assert options[field].type is not click.STRING, (path, field)
                    checked += 1
    assert checked > 100
    for option, value in (("--batch-size", "x"), ("--batch-size", "0"),
                          ("--mixed-precision", "fp64"), ("--ema-decay", "1.5")):  # fmt: skip
        code, _, err = run_cli(monkeypatch, capsys, "distill", "consistency", tmp_path, option,
                               value)  # fmt: skip
        assert code == 2 and f"Invalid value for '{option}'" in err and "Traceback" not in err
