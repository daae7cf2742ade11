"""Bad input, fuzzed (issue #18): $ACCEL_FUZZ_CASES seeded cases (default 100) per kind of input:
safetensors weights, ONNX graphs, engine files, bundle manifests, sampler plans, tokenizer files,
recipes and target TOMLs, NaN/Inf weights, imagefolder images and prompts. Every case runs one
`accel` command (fuzz.Campaign.run) and must end in a result or a clear error: exit 0, 1 or 2,
no traceback, a message that names the problem, nothing half-written. Damaged artifact files are
tried twice: as damaged (their manifest's sha256 refuses them) and with the manifest re-hashed
(what a hand-edited or re-packed artifact would be), so the parser behind the hash is reached."""

from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest

from accel.core.artifact import MANIFEST, hash_tree

from fuzz import FILES, USAGE, Campaign, damage_bytes, damage_document, finite_images, toml_dumps
from record import record

CASES = int(os.environ.get("ACCEL_FUZZ_CASES", "100"))
ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
GATE = '{ metric = "image_rmse", threshold = 1.0, samples = 4, seeds = [0] }'

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny digits model, its graph, engine and bundle; a tiny SD1.5 text-to-image pipeline
    and its bundle (tokenizer, text encoder, UNet, VAE decoder)."""
    from accel.pipeline import default_store

    import families
    from tiny import build, write_tiny_pipeline

    root = tmp_path_factory.mktemp("fuzz")
    store = default_store(root / "store")
    model = write_tiny_pipeline(root / "model")
    graph = build(store, store.source(model), "onnx", num_inference_steps=2)
    engine = build(store, graph, "ort", gate={"metric": "image_rmse", "threshold": 1.0,
                                              "samples": 4})  # fmt: skip
    text_model = families.write_pipeline("sd15", root / "text-model")
    text_graph = build(store, store.source(text_model), "onnx", num_inference_steps=2,
                       guidance_scale=2.0)  # fmt: skip
    text_engine = build(store, text_graph, "ort", gate={"metric": "image_rmse", "threshold": 1.0,
                                                        "samples": 2})  # fmt: skip
    return {
        "root": root,
        "model": model,
        "graph": graph.path,
        "engine": engine.path,
        "bundle": build(store, engine, "bundle", name="fuzz").path,
        "text_model": text_model,
        "text_bundle": build(store, text_engine, "bundle", name="fuzz-text").path,
    }


def rng_for(name: str, case: int) -> np.random.Generator:
    return np.random.default_rng([sum(map(ord, name)), case])


def case_dir(built: dict, name: str, case: int, source: Path) -> Path:
    path = built["root"] / "cases" / f"{name.replace(' ', '-')}-{case}"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(source, path)
    return path


def rehash(artifact: Path) -> None:
    """Make the manifest list the damaged files' hashes, as a re-packed artifact would."""
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"] = hash_tree(artifact)
    (artifact / MANIFEST).write_text(json.dumps(manifest))


def damage_file(file: Path, rng: np.random.Generator) -> str:
    """Damage bytes, or the document's structure when it is JSON (half the time)."""
    data = file.read_bytes()
    if file.suffix == ".json" and rng.random() < 0.5:
        how, doc = damage_document(json.loads(data), rng)
        file.write_text(json.dumps(doc))
        return how
    how, damaged = damage_bytes(data, rng)
    file.write_bytes(damaged)
    return how


def sample_args(model: Path, out: Path, *extra) -> list:
    return ["sample", model, "-n", 2, "--steps", 2, "--out", out, *extra]


def finish(campaign: Campaign, row: str, **extra) -> None:
    figures = campaign.figures()
    assert figures["cases"] > 0
    record("fuzz", input=row, **figures, **extra)


def artifact_campaign(built, name: str, which: str, files, command) -> None:
    """Per case: a copy of artifact ``which``, one of ``files`` damaged, re-hashed every other
    case; ``command(path, out, store)`` run on it."""
    campaign = Campaign(name)
    rehashed = 0
    for case in range(CASES):
        rng = rng_for(name, case)
        path = case_dir(built, name, case, built[which])
        candidates = [f for f in files(path)]
        file = candidates[int(rng.integers(0, len(candidates)))]
        how = damage_file(file, rng)
        if case % 2:
            rehash(path)
            rehashed += 1
        out, store = path.with_suffix(".npz"), path.with_name(f"{path.name}-store")
        store.mkdir()  # a store per case: a stored result of one case must not answer the next
        args, check = command(path, out, store)
        campaign.run(f"{file.relative_to(path)} {how}", args, store=store, out=out,
                     check_result=check, codes=FILES)  # fmt: skip
        shutil.rmtree(path)
        shutil.rmtree(store)
    finish(campaign, name, rehashed=rehashed)


def test_safetensors_weights(built):
    """A source checkpoint's weights truncated or bit-flipped (in the JSON header or anywhere):
    `accel sample` in torch, and every fourth case a distillation that would write the store."""
    campaign = Campaign("safetensors")
    for case in range(CASES):
        rng = rng_for("safetensors", case)
        model = case_dir(built, "safetensors", case, built["model"])
        data = (model / WEIGHTS).read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        how, damaged = damage_bytes(data, rng, header=header)
        (model / WEIGHTS).write_bytes(damaged)
        out, store = model.parent / f"st-{case}.npz", built["root"] / "stores" / "safetensors"
        store.mkdir(parents=True, exist_ok=True)
        if case % 4 == 3:
            args = ["distill", "progressive", model, "--teacher-steps", 2, "--student-steps", 1,
                    "--iterations-per-round", 1, "--batch-size", 2, "--store", store]  # fmt: skip
            campaign.run(how, args, store=store, codes=FILES)
        else:
            campaign.run(how, sample_args(model, out), out=out, check_result=finite_images,
                         codes=FILES)  # fmt: skip
        shutil.rmtree(model)
    finish(campaign, "safetensors weights")


def test_nan_and_inf_weights(built):
    """NaN, +Inf or -Inf in one to all elements of a random tensor: refused, naming it."""
    from safetensors.torch import load_file, save_file

    campaign = Campaign("nan weights")
    for case in range(CASES):
        rng = rng_for("nan", case)
        model = case_dir(built, "nan", case, built["model"])
        tensors = load_file(str(model / WEIGHTS))
        names = sorted(k for k, v in tensors.items() if v.is_floating_point())
        name = names[int(rng.integers(0, len(names)))]
        value = [float("nan"), float("inf"), float("-inf")][case % 3]
        flat = tensors[name].view(-1)
        count = 1 if case % 2 else flat.numel()
        flat[rng.choice(flat.numel(), count, replace=False)] = value
        save_file(tensors, str(model / WEIGHTS))
        out = model.parent / f"nan-{case}.npz"
        code = campaign.run(f"{count} x {value} in {name}", sample_args(model, out), out=out)
        assert code == 1 and name in campaign.last, "a NaN weight was accepted"
        shutil.rmtree(model)
    finish(campaign, "NaN/Inf weights")


def test_onnx_graphs(built):
    def command(path, out, store):
        return ["compile", path, "--gate", GATE, "--out", out.with_suffix(""),
                "--store", store], None  # fmt: skip

    artifact_campaign(built, "onnx graph", "graph", lambda p: [p / "model.onnx"], command)


def test_engine_files(built):
    def command(path, out, store):
        return sample_args(path, out), finite_images

    files = lambda p: sorted(p.glob("model.onnx*"))  # noqa: E731 (the graph and its weights)
    artifact_campaign(built, "engine files", "engine", files, command)


def test_bundle_engine_files(built):
    def command(path, out, store):
        return sample_args(path, out), finite_images

    files = lambda p: sorted(p.glob("model.onnx*"))  # noqa: E731
    artifact_campaign(built, "bundle engine files", "bundle", files, command)


def test_bundle_manifests(built):
    """The bundle's manifest.json itself: bytes, or its structure (keys, types, paths)."""

    def command(path, out, store):
        return sample_args(path, out), finite_images

    campaign = Campaign("bundle manifest")
    for case in range(CASES):
        rng = rng_for("manifest", case)
        path = case_dir(built, "manifest", case, built["bundle"])
        how = damage_file(path / MANIFEST, rng)
        out = path.parent / f"manifest-{case}.npz"
        args, check = command(path, out, None)
        campaign.run(how, args, out=out, check_result=check, codes=FILES)
        shutil.rmtree(path)
    finish(campaign, "bundle manifests")


def test_sampler_plans(built):
    def command(path, out, store):
        return sample_args(path, out), finite_images

    plan = lambda p: [p / "sampler_plan.json"]  # noqa: E731
    artifact_campaign(built, "sampler plan (engine)", "engine", plan, command)
    artifact_campaign(built, "sampler plan (bundle)", "bundle", plan, command)


def test_tokenizer_files(built):
    def command(path, out, store):
        return ["sample", path, "--prompt", "a red circle", "--out", out], finite_images

    files = lambda p: sorted(f for f in p.glob("tokenizer*/*") if f.is_file())  # noqa: E731
    artifact_campaign(built, "tokenizer files", "text_bundle", files, command)


def _recipe_doc(built) -> dict:
    text = (ROOT / "accel" / "recipes" / "digits-pixel.toml").read_text()
    doc = tomllib.loads(text)
    doc["source"] = str(built["model"])
    return doc


def toml_campaign(built, name: str, document, write) -> None:
    """A TOML document damaged in structure (half) or bytes; `accel plan` on the recipe."""
    campaign = Campaign(name)
    for case in range(CASES):
        rng = rng_for(name, case)
        folder = built["root"] / "cases" / f"{name.replace(' ', '-')}-{case}"
        folder.mkdir(parents=True, exist_ok=True)
        if case % 2:
            how, data = damage_bytes(toml_dumps(document()).encode(), rng)
            text = data
        else:
            how, doc = damage_document(document(), rng)
            text = toml_dumps(doc).encode()
        recipe = write(folder, text)
        store = folder / "store"
        campaign.run(how, ["plan", recipe, "--store", store], store=store, codes=USAGE)
        shutil.rmtree(folder)
    finish(campaign, name)


def test_recipes(built):
    def write(folder, data):
        (folder / "r.toml").write_bytes(data)
        return folder / "r.toml"

    toml_campaign(built, "recipe TOML", lambda: _recipe_doc(built), write)


def test_target_tomls(built):
    def write(folder, data):
        (folder / "t.toml").write_bytes(data)
        recipe = _recipe_doc(built)
        recipe["target"] = str(folder / "t.toml")
        (folder / "r.toml").write_text(toml_dumps(recipe))
        return folder / "r.toml"

    target = lambda: tomllib.loads((ROOT / "profiles" / "cpu.toml").read_text())  # noqa: E731
    toml_campaign(built, "target TOML", target, write)


def test_imagefolder_images(built, tmp_path):
    """Training images of a random size and mode, damaged files, non-images, and metadata.jsonl
    lines that are damaged or climb out of the folder: read as training data (RGB at the model's
    resolution) or refused with the file and the fix named."""
    from PIL import Image

    from accel.core.errors import AccelError
    from distill.data import read_imagefolder

    campaign = Campaign("imagefolder")
    modes = ["RGB", "L", "RGBA", "P", "1", "I;16", "CMYK", "LA", "F"]
    for case in range(CASES):
        rng = rng_for("images", case)
        folder = tmp_path / f"images-{case}"
        folder.mkdir()
        size = (16, 16) if case % 3 else tuple(int(s) for s in rng.integers(1, 64, 2))
        mode = modes[case % len(modes)]
        image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(size)
        image = image.convert(mode)
        ext = ".tiff" if mode in ("I;16", "F", "CMYK") else ".png"
        image.save(folder / f"0{ext}")
        row = {"file_name": f"0{ext}", "text": "a seven"}
        how = f"{mode} {size[0]}x{size[1]}"
        damage = case % 4
        if damage == 1:
            what, data = damage_bytes((folder / f"0{ext}").read_bytes(), rng, header=64)
            (folder / f"0{ext}").write_bytes(data)
            how += f", file {what}"
        elif damage == 2:
            what, doc = damage_document(row, rng)
            row, how = doc, f"{how}, metadata {what}"
        meta = json.dumps(row).encode()
        if damage == 3:
            what, meta = damage_bytes(meta, rng)
            how += f", metadata {what}"
        (folder / "metadata.jsonl").write_bytes(meta + b"\n")
        try:
            images, captions = read_imagefolder(folder, (16, 16))
        except AccelError as e:
            assert e.exit_code == 2, f"imagefolder case {case} ({how}): exit code {e.exit_code}"
            campaign.error(e.exit_code, str(e))
            continue
        except Exception as e:  # noqa: BLE001
            raise AssertionError(
                f"imagefolder case {case} ({how}): {type(e).__name__}: {e!s:.500}"
            ) from e
        assert images.shape == (1, 3, 16, 16) and images.abs().max() <= 1 and captions
        campaign.results["result"] += 1
    finish(campaign, "imagefolder images")


PROMPTS = [
    "", " ", "\n\t", "a" * 100_000, "a red circle " * 50_000, "\x00", "\x1b[31mred\x1b[0m",
    "\udcff\udcfe not UTF-8", "caf\udce9", "😀" * 100, "\u202eelcric der a", "e\u0301" * 200,
    "\ufeffBOM", "a\r\nb", "𝔞 𝔯𝔢𝔡 𝔠𝔦𝔯𝔠𝔩𝔢", "<|endoftext|>" * 20,
]  # fmt: skip


def random_prompt(rng: np.random.Generator) -> str:
    """Up to 300 random code points from all of Unicode, surrogates (undecodable bytes) included."""
    return "".join(chr(int(c)) for c in rng.integers(1, 0x110000, int(rng.integers(0, 300))))


@pytest.mark.parametrize("model", ["text_bundle", "text_model"])
def test_prompts(built, model):
    """Empty, huge (10^5 and 6.5 x 10^5 characters), control characters, undecodable bytes (as
    Python hands them over: surrogate escapes), combining marks, special tokens and random code
    points: images of the prompt (truncated to the encoder's tokens) or a clear refusal."""
    campaign = Campaign(f"prompts ({model})")
    prompts = PROMPTS + [random_prompt(rng_for("prompt", i)) for i in range(CASES)]
    for case, prompt in enumerate(prompts):
        out = built["root"] / f"prompt-{model}-{case}.npz"
        args = ["sample", built[model], "--prompt", prompt, "--steps", 2, "--out", out]
        campaign.run(repr(prompt[:40]), args, out=out, check_result=finite_images, codes=USAGE)
        out.unlink(missing_ok=True)
    finish(campaign, f"prompts, {model.replace('_', ' ')}")
