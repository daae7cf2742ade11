"""Deploy targets for bundles. ``triton_repository`` writes a Triton Inference Server model
repository (https://github.com/triton-inference-server/server, docs/user_guide/model_repository.md
and model_configuration.md):

- a fused-sampler bundle becomes one model: noise (+ labels, + step noise) in, images out;
- a per-step bundle becomes two: ``<name>_denoiser``, the engine, with dynamic batching, and
  ``<name>``, a Python-backend model (``accel/deploy/triton_bls.py``) that runs the sampler loop over it
  through business-logic scripting;
- a text-to-image pipeline bundle becomes four: ``<name>_text_encoder``, ``<name>_denoiser`` and
  ``<name>_vae_decoder``, each an engine with dynamic batching, and ``<name>``, the Python-backend
  model that tokenizes the prompts (the bundle's ``tokenizer.json`` files beside it) and runs text
  encoder, sampler loop and VAE decoder through BLS: prompt and noise in, images out.

The engine model uses the onnxruntime backend for ONNX bundles and ``tensorrt_plan`` (with
``cc_model_filenames`` naming the plan per compute capability) for TensorRT bundles. Batch limits
and the preferred batch come from the bundle's target (doubled where the per-step graph runs
classifier-free guidance's doubled batch); instance groups are KIND_GPU on GPU targets and
KIND_CPU otherwise.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from accel.core.errors import CheckpointError
from accel.core.plan import PLAN_FILE, SamplerPlan
from accel.runtime.backends import backend

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "bfloat16": "TYPE_BF16", "string": "TYPE_STRING"}  # fmt: skip
BLS_FILE = Path(__file__).with_name("triton_bls.py")
MARKER = ".accel-triton-repository"
"""Written into every repository this module fills: `accel deploy triton` replaces only those."""


def _tensor(spec: dict, batched: bool, optional: bool = False) -> str:
    """One input/output entry. With max_batch_size > 0 Triton's dims leave out the batch axis; a
    tensor that is only a batch axis becomes dims [1] reshaped to []."""
    if spec["dtype"] not in TRITON_TYPES:
        raise CheckpointError(f"{spec['name']}: dtype {spec['dtype']} has no Triton type here")
    dims = [d if isinstance(d, int) and d > 0 else -1 for d in spec["shape"]]
    dims = dims[1:] if batched else dims
    reshape = ""
    if not dims:
        dims, reshape = [1], " reshape: { shape: [ ] }"
    flag = " optional: true" if optional else ""
    return (
        f'  {{ name: "{spec["name"]}" data_type: {TRITON_TYPES[spec["dtype"]]} '
        f"dims: [ {', '.join(map(str, dims))} ]{reshape}{flag} }}"
    )


def _instances(info: dict, count: int) -> str:
    kind = "KIND_GPU" if info["target"]["device"] == "cuda" else "KIND_CPU"
    return f"instance_group [ {{ count: {count} kind: {kind} }} ]"


def _engine_config(
    name: str, info: dict, batch_factor: int, count: int, delay_us: int, file: str | None = None
) -> str:
    b = info["target"]["batch"]
    lines = [f'name: "{name}"']
    triton = backend(info["backend"]).triton
    if triton is None:
        raise CheckpointError(
            f"Triton has no backend for {info['backend']} bundles; bundle an onnxruntime or "
            "TensorRT engine (`accel compile --backend ort|tensorrt`)"
        )
    file = file or "model" + backend(info["backend"]).suffix
    if triton == "tensorrt_plan":  # a platform, with one plan per compute capability
        cc = info["target"]["compute_capability"]
        lines += [
            f'platform: "{triton}"',
            f'default_model_filename: "{file}"',
            f'cc_model_filenames {{ key: "{cc}" value: "{file}" }}',
        ]
    else:
        lines += [f'backend: "{triton}"', f'default_model_filename: "{file}"']
    lines += [
        f"max_batch_size: {b['max'] * batch_factor}",
        "input [",
        ",\n".join(_tensor(s, batched=True) for s in info["inputs"]),
        "]",
        "output [",
        ",\n".join(_tensor(s, batched=True) for s in info["outputs"]),
        "]",
        f"dynamic_batching {{ preferred_batch_size: [ {b['opt'] * batch_factor} ] "
        f"max_queue_delay_microseconds: {delay_us} }}",
        _instances(info, count),
    ]
    provider = info.get("provider") or ""
    if provider.startswith("Tensorrt"):
        lines.append(
            "optimization { execution_accelerators { gpu_execution_accelerator: [ "
            '{ name: "tensorrt" } ] } }'
        )
    return "\n".join(lines) + "\n"


def _bls_config(
    name: str,
    denoiser: str,
    info: dict,
    plan: SamplerPlan,
    count: int,
    max_batch: int,
    components: dict[str, str] | None = None,
) -> str:
    noise = ["batch", *plan.sample_shape]
    image = noise
    inputs = [_tensor({"name": "noise", "dtype": "float32", "shape": noise}, batched=False)]
    params = []
    if components:  # a pipeline: prompts in, decoded images out
        inputs.append(_tensor({"name": "prompt", "dtype": "string", "shape": ["batch"]}, False))
        image = info["components"]["vae_decoder"]["outputs"][0]["shape"]
        params = [
            f'parameters {{ key: "{role}_model" value: {{ string_value: "{model}" }} }}'
            for role, model in components.items()
        ]
        params.append(
            f'parameters {{ key: "component_max_batch" value: '
            f'{{ string_value: "{info["target"]["batch"]["max"]}" }} }}'
        )
    if plan.num_classes:
        spec = {"name": "class_labels", "dtype": "int64", "shape": ["batch"]}
        inputs.append(_tensor(spec, batched=False))
    inputs.append(_tensor({"name": "seed", "dtype": "int64", "shape": [1]}, False, optional=True))
    graph_inputs = ",".join(s["name"] for s in info["inputs"])
    return (
        "\n".join(
            [
                f'name: "{name}"',
                'backend: "python"',
                "max_batch_size: 0",
                "input [",
                ",\n".join(inputs),
                "]",
                "output [",
                _tensor({"name": "images", "dtype": "float32", "shape": image}, batched=False),
                "]",
                _instances(dict(info, target=dict(info["target"], device="cpu")), count),
                f'parameters {{ key: "denoiser_model" value: {{ string_value: "{denoiser}" }} }}',
                f'parameters {{ key: "denoiser_inputs" value: {{ string_value: "{graph_inputs}" }} }}',
                f'parameters {{ key: "denoiser_max_batch" value: {{ string_value: "{max_batch}" }} }}',
                *params,
            ]
        )
        + "\n"
    )


def triton_repository(
    bundle_dir: str | Path, out: Path, instances: int = 1, max_queue_delay_us: int = 100
) -> list[str]:
    """Fill ``out`` (an empty directory) with the model repository for the bundle; returns the
    model names, the one clients call first."""
    from accel.core.artifact import Artifact
    from accel.core.plan import batch_factor

    bundle = Artifact.load(bundle_dir)
    if bundle.kind != "bundle":
        raise CheckpointError(f"{bundle_dir} is a {bundle.kind}, not a bundle: run `accel bundle`")
    bundle.verify()
    (out / MARKER).write_text(f"written by accel deploy triton from bundle {bundle.key}\n")
    info = bundle.info
    plan = SamplerPlan.load(bundle.path / PLAN_FILE)
    name = info["name"]
    engine_name = name if info["fused"] else f"{name}_denoiser"
    version = out / engine_name / "1"
    version.mkdir(parents=True)
    suffix = backend(info["backend"]).suffix
    engine_file = info["engine_file"]
    for f in bundle.path.glob(engine_file + "*"):  # the graph and its external data
        target = "model" + suffix + f.name[len(engine_file) :]
        shutil.copy(f, version / target)
    factor = batch_factor(plan, {s["name"]: s["shape"] for s in info["inputs"]})
    (out / engine_name / "config.pbtxt").write_text(
        _engine_config(engine_name, info, factor, instances, max_queue_delay_us)
    )
    if info["fused"]:
        return [engine_name]
    components: dict[str, str] = {}
    for role, file in plan.components.items():  # a pipeline's other engines
        model = components[role] = f"{name}_{role}"
        (out / model / "1").mkdir(parents=True)
        for f in bundle.path.glob(file + "*"):  # names kept: the graph names its external data
            shutil.copy(f, out / model / "1" / f.name)
        io = info["components"][role]
        (out / model / "config.pbtxt").write_text(
            _engine_config(model, dict(info, **io), 1, instances, max_queue_delay_us, file)
        )
    bls = out / name / "1"
    bls.mkdir(parents=True)
    shutil.copy(BLS_FILE, bls / "model.py")
    shutil.copy(bundle.path / PLAN_FILE, bls / PLAN_FILE)
    if plan.components:  # the BLS model tokenizes and adds the stored conditioning itself
        from accel.runtime.pipeline import copy_pipeline_files

        copy_pipeline_files(bundle.path, bls, plan, roles=[])
    max_batch = info["target"]["batch"]["max"] * factor
    (out / name / "config.pbtxt").write_text(
        _bls_config(name, engine_name, info, plan, instances, max_batch, components)
    )
    return [name, engine_name, *components.values()]
