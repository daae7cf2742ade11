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
    assert target.backends[0] == "ort" and target.provider == "CPUExecutionProvider"
    assert (target.shapes.batch.min, target.shapes.batch.opt, target.shapes.batch.max) == (1, 4, 64)
    assert target.harness.duration_ms == 3000 and target.harness.iterations is None
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
    nested = write(tmp_path, CPU.replace("min_iterations =", "min_iteration ="), "n.toml")
    with pytest.raises(
        TargetError, match=r"'harness.min_iteration'; did you mean 'harness.min_iterations'"
    ):
        load_target(str(nested))


def test_invalid_toml_names_file_and_line(tmp_path):
    path = write(tmp_path, CPU.replace("[harness]", "[harness"))
    with pytest.raises(TargetError, match=r"not valid TOML.*line"):
        load_target(str(path))


def test_missing_target_file(tmp_path):
    with pytest.raises(TargetError, match="target file not found"):
        load_target(str(tmp_path / "nope.toml"))


REQUIRED = {
    "cpu": "generic x86-64",
    "cpu-avx512": "AVX-512",
    "h100-sxm": "H100",
    "h200": "H200",
    "a100-80gb": "A100",
    "l40s": "L40S",
    "l4": "L4",
    "rtx-4090": "RTX 4090",
    "jetson-agx-orin": "Orin",
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_shipped_targets_validate(name):
    t = load_target(name)  # the schema: every field typed, unknown keys refused
    assert t.name == name, "a target's name is its file's name"
    assert REQUIRED[name].lower() in t.description.lower()
    assert t.latency_budget_ms
    assert t.shapes.batch.min <= t.scenarios.single_stream_batch <= t.shapes.batch.max
    if t.device == "cuda":
        assert t.gpu and t.compute_capability and t.memory_gib
        assert t.precision in ("fp16", "bf16", "fp8", "int8")
        assert t.builder.workspace_mib
    else:
        assert t.cpu_flags and t.backends[0] == "ort"


def test_every_profile_file_is_a_valid_target():
    assert set(REQUIRED) <= set(list_targets())
    fingerprints = {load_target(n).fingerprint for n in list_targets()}
    assert len(fingerprints) == len(list_targets())


def test_compute_capabilities_of_the_gpu_catalogue():
    cc = {
        n: load_target(n).compute_capability
        for n in REQUIRED
        if n.startswith(("h", "a", "l", "r", "j"))
    }
    assert cc == {
        "h100-sxm": "9.0",
        "h200": "9.0",
        "a100-80gb": "8.0",
        "l40s": "8.9",
        "l4": "8.9",
        "rtx-4090": "8.9",
        "jetson-agx-orin": "8.7",
    }


def test_shapes_in_trtexec_syntax(tmp_path):
    flags = (
        "--minShapes=sample:1x4x32x32 --optShapes=sample:8x4x64x64 --maxShapes=sample:16x4x96x96"
    )
    text = CPU.replace(
        "batch = { min = 1, opt = 4, max = 64 }\nresolution = { min = 16, opt = 16, max = 16 }",
        f'trtexec = "{flags}"',
    )
    assert "trtexec" in text
    t = load_target(str(write(tmp_path, text)))
    assert (t.shapes.batch.min, t.shapes.batch.opt, t.shapes.batch.max) == (1, 8, 16)
    assert (t.shapes.resolution.min, t.shapes.resolution.max) == (32, 96)
    assert t.shapes.trtexec() == flags  # and back
    bad = write(tmp_path, text.replace("--maxShapes=sample:16x4x96x96", ""), "bad.toml")
    with pytest.raises(
        TargetError, match=r"shapes.*needs --minShapes, --optShapes and --maxShapes"
    ):
        load_target(str(bad))


def test_a_gpu_target_without_compute_capability_says_so(tmp_path):
    path = write(
        tmp_path,
        (Path(__file__).resolve().parents[1] / "profiles" / "l4.toml")
        .read_text()
        .replace('compute_capability = "8.9"', ""),
    )
    with pytest.raises(TargetError, match=r"a cuda target needs gpu .* and compute_capability"):
        load_target(str(path))
    path = write(tmp_path, CPU.replace('device = "cpu"', 'device = "tpu"'), "tpu.toml")
    with pytest.raises(TargetError, match=r"key 'device'.*'cpu' or 'cuda'"):
        load_target(str(path))


def catalogue():
    return [load_target(n) for n in list_targets()]


def cpu(*flags):
    return {"model": "test CPU", "flags": list(flags), "logical_cores": 2, "affinity_cores": 2}


def gpu(name, cc, mib=81559):
    return [{"name": name, "compute_capability": cc, "memory_total_mib": mib}]


@pytest.mark.parametrize(
    "machine, expected",
    [
        ((cpu("avx2", "fma"), None), "cpu"),
        (
            (cpu("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"), None),
            "cpu-avx512",
        ),
        ((cpu("avx2", "fma", "avx512f"), None), "cpu"),  # AVX-512 without VNNI
        ((cpu("avx2", "fma"), gpu("NVIDIA H100 80GB HBM3", "9.0")), "h100-sxm"),
        ((cpu(), gpu("NVIDIA H200", "9.0", 143771)), "h200"),
        ((cpu(), gpu("NVIDIA A100-SXM4-80GB", "8.0")), "a100-80gb"),
        ((cpu(), gpu("NVIDIA L40S", "8.9", 46068)), "l40s"),
        ((cpu(), gpu("NVIDIA L4", "8.9", 23034)), "l4"),
        ((cpu(), gpu("NVIDIA GeForce RTX 4090", "8.9", 24564)), "rtx-4090"),
        # no target names an H100 PCIe: the same compute capability and the closest memory
        ((cpu(), gpu("NVIDIA H100 PCIe", "9.0", 81559)), "h100-sxm"),
        # whole-word names: an L40 is not an L4, a GH200 (96 GB) is not an H200
        ((cpu(), gpu("NVIDIA L40", "8.9", 46068)), "l40s"),
        ((cpu(), gpu("NVIDIA GH200 480GB", "9.0", 97871)), "h100-sxm"),
    ],
)
def test_detect_names_the_closest_target(machine, expected):
    from accel.core.hardware import detect

    target, why = detect(catalogue(), cpu=machine[0], gpus=machine[1] or [], jetson="")
    assert target.name == expected, why


def test_detect_a_jetson_by_its_device_tree_model():
    from accel.core.hardware import detect

    jetson = "NVIDIA Jetson AGX Orin Developer Kit"
    target, why = detect(catalogue(), cpu=cpu(), gpus=[], jetson=jetson)
    assert target.name == "jetson-agx-orin" and "device-tree" in why


def test_detect_with_no_fitting_target_says_how_to_add_one():
    from accel.core.hardware import detect

    with pytest.raises(TargetError, match=r"no target fits this machine.*profiles/<name>.toml"):
        detect(catalogue(), cpu=cpu("sse2"), gpus=[], jetson="")


def test_detect_on_this_machine_names_the_avx512_target():
    from accel.core.hardware import cpu_info, detect, gpu_info

    needed = set(load_target("cpu-avx512").cpu_flags)
    if gpu_info() or not needed <= set(cpu_info()["flags"]):
        pytest.skip("this machine is not an AVX-512 VNNI CPU without a GPU")
    assert detect(catalogue())[0].name == "cpu-avx512"


def test_target_mismatch_names_what_differs():
    from accel.core.hardware import target_mismatch

    h100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert target_mismatch(load_target("h100-sxm"), {"gpus": [h100]}) is None
    l40s = {"name": "NVIDIA L40S", "compute_capability": "8.9"}
    assert "not the target's" in target_mismatch(load_target("l4"), {"gpus": [l40s]})
    assert "NVML sees no GPU" in target_mismatch(load_target("l4"), {"gpus": None})
    avx2 = {"cpu": "old", "cpu_flags_all": ["avx2", "fma"]}
    assert target_mismatch(load_target("cpu"), avx2) is None
    assert "avx512_vnni" in target_mismatch(load_target("cpu-avx512"), avx2)
    orin = {"gpus": None, "jetson": "NVIDIA Jetson AGX Orin Developer Kit"}
    assert target_mismatch(load_target("jetson-agx-orin"), orin) is None
    nano = {"gpus": None, "jetson": "NVIDIA Jetson Orin Nano Developer Kit"}
    assert target_mismatch(load_target("jetson-agx-orin"), nano) is not None
