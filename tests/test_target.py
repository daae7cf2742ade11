from pathlib import Path

import pytest

from accel.core.errors import TargetError
from accel.core.target import list_targets, load_target

CPU = (Path(__file__).resolve().parents[1] / "profiles" / "cpu.toml").read_text()


def write(tmp_path: Path, text: str, name: str = "t.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cpu_profile_loads():
    target = load_target("cpu")
    assert target.device == "cpu"
    assert target.backends[0] == "onnxruntime"
    assert (target.shapes.batch.min, target.shapes.batch.opt, target.shapes.batch.max) == (1, 4, 64)
    assert target.profile.iterations == 50
    assert "cpu" in list_targets()


def test_fingerprint_stable_and_sensitive(tmp_path):
    a = load_target("cpu").fingerprint
    assert a == load_target(str(write(tmp_path, CPU))).fingerprint
    changed = CPU.replace('precision = "fp32"', 'precision = "fp16"')
    assert load_target(str(write(tmp_path, changed, "b.toml"))).fingerprint != a


def test_unknown_target_name_suggests_closest():
    with pytest.raises(TargetError, match=r"unknown target 'cpux'; did you mean 'cpu'\?.*cpu"):
        load_target("cpux")


def test_profiles_dir_env_override(tmp_path, monkeypatch):
    write(tmp_path, CPU.replace('name = "cpu"', 'name = "edge"'), "edge.toml")
    monkeypatch.setenv("ACCEL_PROFILES", str(tmp_path))
    assert list_targets() == ["edge"]
    assert load_target("edge").name == "edge"


def test_bad_field_names_its_path(tmp_path):
    path = write(tmp_path, CPU.replace("opt = 4", 'opt = "four"'))
    with pytest.raises(TargetError) as e:
        load_target(str(path))
    assert str(path) in str(e.value)
    assert "key 'shapes.batch.opt'" in str(e.value)
    assert "'four'" in str(e.value)


def test_min_greater_than_opt_rejected(tmp_path):
    path = write(tmp_path, CPU.replace("min = 1, opt = 4", "min = 8, opt = 4"))
    with pytest.raises(TargetError, match=r"shapes\.batch.*min <= opt <= max.*min=8 opt=4"):
        load_target(str(path))


def test_unknown_key_suggests_closest(tmp_path):
    path = write(tmp_path, CPU.replace("precision =", "precison ="))
    with pytest.raises(TargetError, match=r"unknown key 'precison'; did you mean 'precision'\?"):
        load_target(str(path))
    nested = write(tmp_path, CPU.replace("iterations =", "iteration ="), "n.toml")
    with pytest.raises(
        TargetError, match=r"'profile.iteration'; did you mean 'profile.iterations'"
    ):
        load_target(str(nested))


def test_invalid_toml_names_file_and_line(tmp_path):
    path = write(tmp_path, CPU.replace("[profile]", "[profile"))
    with pytest.raises(TargetError, match=r"not valid TOML.*line"):
        load_target(str(path))


def test_missing_target_file(tmp_path):
    with pytest.raises(TargetError, match="target file not found"):
        load_target(str(tmp_path / "nope.toml"))
