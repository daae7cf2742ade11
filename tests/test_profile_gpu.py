"""The harness's GPU paths: CUDA-event timing, NVML readings, detection of the GPU's target, GPU
memory, and a profile of a tiny model on the GPU with its host<->device copies broken out."""

import numpy as np
import pytest

from tiny import gpu_target, write_tiny_pipeline

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)


def test_cuda_events_time_gpu_work():
    from accel.profile.harness import cuda_timer, host_timer

    a = torch.randn(4096, 4096, device="cuda")

    def work():
        for _ in range(20):
            a @ a
        return None

    work()
    torch.cuda.synchronize()
    host_timer(work)  # returns once the kernels are queued: the GPU is still busy
    assert not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    timed = cuda_timer()
    assert timed(work) > 0
    assert torch.cuda.current_stream().query()  # the event timer waited for the GPU's work


def test_nvml_reads_the_gpu_and_detect_names_its_target():
    from accel.core.hardware import detect, environment, gpu_info
    from accel.core.target import list_targets, load_target

    gpus = gpu_info()
    assert gpus, "nvidia-ml-py and a driver should be present on a GPU machine"
    g = gpus[0]
    major, minor = torch.cuda.get_device_capability(0)
    assert g["compute_capability"] == f"{major}.{minor}"
    assert g["driver"] and g["memory_total_mib"] > 1000
    assert g["clocks"]["sm_mhz"]["max"] and g["power_limit_w"]
    assert isinstance(g["throttle_reasons"], list)
    target, why = detect([load_target(n) for n in list_targets()])
    assert target.device == "cuda" and target.compute_capability == g["compute_capability"]
    print(f"detected {target.name}: {why}")
    assert environment()["gpus"][0]["name"] == g["name"]


def test_gpu_profile_of_a_tiny_model(tmp_path):
    from accel.profile.harness import Harness
    from accel.profile.stage import profile_runtimes
    from accel.report import Report, write_report
    from accel.runtime import sample
    from export.torch_runtime import open_model

    # a target for the GPU at hand, known to the catalogue or not
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    target = gpu_target(gpu=name.removeprefix("NVIDIA "), compute_capability=f"{major}.{minor}")
    path = write_tiny_pipeline(tmp_path / "teacher")
    gpu_rt, plan = open_model(path, steps=4, device="cuda")
    cpu_rt, _ = open_model(path, steps=4)
    noise = np.random.default_rng(0).standard_normal((4, 1, 16, 16)).astype(np.float32)
    labels = np.arange(4, dtype=np.int64)
    a, b = sample(gpu_rt, plan, noise, labels), sample(cpu_rt, plan, noise, labels)
    assert np.abs(a - b).max() < 1e-3

    harness = Harness.of(target, warmup_ms=50, duration_ms=300)
    assert harness.timer == "cuda"
    report = profile_runtimes(
        {"tiny cuda": (gpu_rt, plan)},
        target,
        ["single_stream", "offline", "server"],
        harness,
        rate_qps=50,
        server_duration_s=1,
        progress=lambda m: None,
    )
    written = write_report(tmp_path, report)
    Report.model_validate(written)
    ss = report["scenarios"]["single_stream"]["results"]["tiny cuda"]
    assert ss["latency_ms"]["n"] >= 10 and ss["memory"]["torch_cuda_peak_allocated_mib"] > 0
    assert ss["memory"]["nvml_device_used_mib"] > ss["memory"]["torch_cuda_peak_allocated_mib"]
    sections = report["breakdown"]["tiny cuda"]
    assert {"h2d", "compute", "d2h", "conditioning"} <= set(sections)
    assert report["environment"]["gpus"]
    assert not any("not the target's" in w for w in report["warnings"])
    print((tmp_path / "report.md").read_text())


def test_cuda_python_buffers_round_trip_without_torch():
    """The device memory layer of TensorRT bundles (accel.runtime.cudart) on a real GPU."""
    from accel.runtime.cudart import Stream

    stream = Stream()
    for shape, dtype in (((4, 1, 16, 16), np.float32), ((7,), np.int64), ((3, 5), np.float16)):
        host = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        ptr = stream.upload("x", host)
        assert ptr and stream.buffer("x", host.nbytes) == ptr  # reused while big enough
        np.testing.assert_array_equal(stream.download(ptr, shape, np.dtype(dtype)), host)
    big = stream.upload("x", np.ones((1024, 1024), np.float32))  # grows the buffer
    assert stream.download(big, (1024, 1024), np.dtype(np.float32)).sum() == 1024 * 1024
    stream.close()
