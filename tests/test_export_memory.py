"""Export at real size holds one copy of a large component: its torch weights are released once
its reference outputs are computed, before onnxruntime opens the exported graph (a 10 GB SDXL
UNet in torch and in onnxruntime would not fit a 24 GB machine together); diffusers' UNets
export with dynamo under their batch bound, not TorchScript (whose protobuf copies the weights)."""

import json

import families
from tiny import run_cli


def test_large_components_are_released_before_onnxruntime_opens_them(tmp_path, monkeypatch, capsys):
    import export.onnx_export as onnx_export
    import export.pipeline_export as pipeline_export

    monkeypatch.setattr(pipeline_export, "RELEASE_BYTES", 0)  # every component counts as large
    released = []
    original = onnx_export.onnx_parity

    freed = {}

    def spied(path, reference, feeds, extra=None, then=None):
        def release():
            import gc
            import weakref

            module = reference.module
            before = [weakref.ref(p) for p in module.parameters()]
            then()
            gc.collect()
            released.append(all(p.device.type == "meta" for p in module.parameters()))
            # freed, not only replaced: nothing (onnxscript's rewrite rules keep the last graph
            # they matched, whose initializers wrapped these tensors) holds the old weights
            freed[path.name] = sum(r() is None for r in before) / len(before)

        return original(path, reference, feeds, extra, release if then else None)

    monkeypatch.setattr(onnx_export, "onnx_parity", spied)
    teacher = families.write_pipeline("sd15", tmp_path / "teacher")
    code, _, err = run_cli(monkeypatch, capsys, "export", "onnx", teacher, "--num-inference-steps",
                           2, "--guidance-scale", 2.0, "--out", tmp_path / "onnx",
                           "--store", tmp_path / "store")  # fmt: skip
    assert code == 0, err
    assert released == [True, True, True]  # text encoder, UNet, VAE decoder: each released
    assert freed == dict.fromkeys(["text_encoder.onnx", "model.onnx", "vae_decoder.onnx"], 1.0)
    metrics = json.loads((tmp_path / "onnx" / "manifest.json").read_text())["metrics"]
    components = metrics["components"]
    assert all(c["parity"]["passed"] for c in components.values())
    assert components["denoiser"]["exporter"] == "dynamo"
    assert components["denoiser"]["dynamo_max_batch"] == 63
    assert "batch_bound_found" not in components["denoiser"]  # the adapter said so up front
