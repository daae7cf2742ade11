"""Text-to-image teachers (tiny SD1.5 and SDXL pipelines, tests/families.py) through progressive
distillation: training data from an imagefolder or a prompt file, students that are whole stock
pipelines, and bad data refused in one line before training starts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from accel.core.model_info import ModelInfo

import families
from tiny import run_cli

# Measured: at most 1e-6 between accel's DDIM (float32 numpy) and the stock DDIMScheduler; 1e-4
# leaves room for BLAS differences between machines.
TOLERANCE = 1e-4
PROMPT = "a red circle"
FAMILY = {"sd": "sd15", "sdxl": "sdxl"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {f: families.write_pipeline(FAMILY[f], root / f) for f in FAMILY}


def write_imagefolder(path, n=6, size=32, **row):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a shape number {i}", **row}))
    (path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return path


METHODS = {  # the options of a few-iteration run, and the stock pipeline and scheduler
    "progressive": (
        ["progressive", "--teacher-steps", 4, "--student-steps", 2, "--iterations-per-round", 2],
        {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"},
        "DDIMScheduler",
    ),
    "consistency": (
        ["consistency", "--solver-steps", 10, "--num-inference-steps", 2, "--iterations", 2],
        {"sd": "LatentConsistencyModelPipeline", "sdxl": "StableDiffusionXLPipeline"},
        "LCMScheduler",
    ),
    "dmd2": (
        ["adversarial", "--student-steps", 2, "--iterations", 2,
         "--critic-updates-per-generator", 1],
        {"sd": "LatentConsistencyModelPipeline", "sdxl": "StableDiffusionXLPipeline"},
        "LCMScheduler",
    ),
    # ADD in LADD's form: the discriminator on the frozen teacher's mid_block at noised latents
    "add": (
        ["adversarial", "--method", "add", "--student-steps", 2, "--iterations", 2],
        {"sd": "LatentConsistencyModelPipeline", "sdxl": "StableDiffusionXLPipeline"},
        "LCMScheduler",
    ),
    "guidance": (
        ["guidance", "--iterations", 2],
        {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"},
        "DDIMScheduler",
    ),
}  # fmt: skip
# students that take w as an input (diffusers' time_cond_proj_dim): one pass at any w
W_INPUT = {"progressive": False, "consistency": True, "dmd2": True, "add": True, "guidance": True}


def distil(monkeypatch, capsys, teacher, out, store, dataset, method="progressive"):
    return run_cli(
        monkeypatch, capsys, "distill", METHODS[method][0][0], teacher, *METHODS[method][0][1:],
        "--batch-size", 2,
        "--guidance-scale", 2.0, "--dataset", dataset, "--out", out, "--store", store,
    )  # fmt: skip


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize(("family", "source"), [("sd", "imagefolder"), ("sdxl", "prompts")])
def test_students_are_stock_pipelines(
    method, family, source, teachers, tmp_path, monkeypatch, capsys
):
    import diffusers
    import diffusers.schedulers.scheduling_lcm as lcm

    if source == "imagefolder":
        dataset = f"imagefolder:{write_imagefolder(tmp_path / 'images')}"
    else:
        (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n\na green cross\n")
        dataset = f"prompts:{tmp_path / 'prompts.txt'}"
    student = tmp_path / "student"
    code, _, err = distil(
        monkeypatch, capsys, teachers[family], student, tmp_path / "store", dataset, method
    )
    assert code == 0, err
    info = ModelInfo.read(student)
    assert info.method == method
    assert info.num_inference_steps == (None if method == "guidance" else 2)
    # an LCM student takes w as an input (time_cond_proj_dim): sample it with w, one pass
    w = 2.0 if W_INPUT[method] else 1.0
    assert info.guidance_scale == w
    assert info.distilled_guidance_scale == (None if W_INPUT[method] else 2.0)
    # the whole pipeline: unchanged components are links to the teacher's files in the store
    _, pipeline_class, scheduler_class = METHODS[method]
    index = json.loads((student / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class[family]
    assert index["scheduler"] == ["diffusers", scheduler_class] and (student / "vae").is_dir()
    stored = [p.parent for p in (tmp_path / "store" / "artifacts").glob("*/accel.json")]
    stored = [p for p in stored if ModelInfo.read(p).method == method]
    assert len(stored) == 1 and next((stored[0] / "vae").glob("*.safetensors")).stat().st_nlink >= 2

    out = tmp_path / "s.npz"
    code, _, err = run_cli(monkeypatch, capsys, "sample", student, "--prompt", PROMPT,
                           "--steps", 2, "--seed", 0, "--out", out)  # fmt: skip
    assert code == 0, err
    ours = np.load(out)
    pipe = getattr(diffusers, pipeline_class[family]).from_pretrained(student)
    pipe = families.prepare(pipe)
    assert type(pipe.scheduler).__name__ == scheduler_class
    # LCMScheduler.step re-noises with fresh noise: hand it the draws accel sample made
    rng = np.random.default_rng([0, 1])
    monkeypatch.setattr(lcm, "randn_tensor", lambda shape, **kw: torch.from_numpy(
        rng.standard_normal(tuple(shape), dtype=np.float32)))  # fmt: skip
    stock = pipe(
        [PROMPT], latents=torch.from_numpy(ours["latents"]), num_inference_steps=2,
        guidance_scale=w, output_type="np", height=32, width=32,
    ).images  # fmt: skip
    assert np.abs(stock - ours["images"].transpose(0, 2, 3, 1)).max() <= TOLERANCE
    # the student moved away from its teacher
    teacher_unet = next((teachers[family] / "unet").glob("*.safetensors")).read_bytes()
    assert next((student / "unet").glob("*.safetensors")).read_bytes() != teacher_unet


def _refused(monkeypatch, capsys, teachers, tmp_path, dataset, match):
    store = tmp_path / "store"
    code, _, err = distil(monkeypatch, capsys, teachers["sd"], tmp_path / "student", store, dataset)
    assert code != 0 and "Traceback" not in err
    assert match in err, err
    assert not (tmp_path / "student").exists()
    assert (
        not list((store / "artifacts").glob("*/unet")) if (store / "artifacts").is_dir() else True
    )


def test_bad_imagefolders_are_one_line(teachers, tmp_path, monkeypatch, capsys):
    folder = write_imagefolder(tmp_path / "missing")
    (folder / "3.png").unlink()
    _refused(monkeypatch, capsys, teachers, tmp_path, f"imagefolder:{folder}",
             "metadata.jsonl:4: image")  # fmt: skip
    folder = write_imagefolder(tmp_path / "nocaption")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": rows[0]["file_name"]}) + "\n")
    _refused(monkeypatch, capsys, teachers, tmp_path, f"imagefolder:{folder}",
             "has no 'text' column")  # fmt: skip
    folder = write_imagefolder(tmp_path / "empty", text="  ")
    _refused(monkeypatch, capsys, teachers, tmp_path, f"imagefolder:{folder}", "is empty")
    folder = write_imagefolder(tmp_path / "size", size=24)
    _refused(monkeypatch, capsys, teachers, tmp_path, f"imagefolder:{folder}",
             "is 24x24; the model trains at 32x32")  # fmt: skip
    folder = write_imagefolder(tmp_path / "garbled")
    (folder / "2.png").write_bytes(b"\x89PNG not really")
    _refused(monkeypatch, capsys, teachers, tmp_path, f"imagefolder:{folder}",
             "is not a readable image")  # fmt: skip


def test_bad_prompt_files_and_dataset_names_are_one_line(teachers, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    _refused(monkeypatch, capsys, teachers, tmp_path, f"prompts:{tmp_path / 'empty.txt'}",
             "holds no prompts")  # fmt: skip
    _refused(monkeypatch, capsys, teachers, tmp_path, f"prompts:{tmp_path / 'nope.txt'}",
             "prompt file not found")  # fmt: skip
    _refused(monkeypatch, capsys, teachers, tmp_path, "laion", "unknown dataset 'laion'")


def test_imagefolder_latents_are_cached_once(teachers, tmp_path):
    from distill.checkpoint import load_denoiser
    from distill.data import load_dataset

    den, _ = load_denoiser(teachers["sd"])
    name = f"imagefolder:{write_imagefolder(tmp_path / 'images')}"
    x0, cond = load_dataset(name, den, tmp_path / "cache")
    assert x0.shape == (6, 4, 16, 16) and cond["encoder_hidden_states"].shape[0] == 6
    assert len(list((tmp_path / "cache").iterdir())) == 1
    again = load_dataset(name, den, tmp_path / "cache")
    assert torch.equal(again[0], x0) and torch.equal(
        again[1]["encoder_hidden_states"], cond["encoder_hidden_states"]
    )
    # the latents decode back near the images: the VAE's encode is decode's inverse in scale
    images = den.adapter.decode(x0)
    assert images.shape == (6, 3, 32, 32)


def test_large_images_encode_a_few_at_a_time(teachers, tmp_path, monkeypatch):
    """The VAE encodes as many images per call as ``DRAW_PIXELS`` allows (one at 512 px: SDXL's
    encoder holds GBs of activations per 1024 px image), and the latents are those of one call."""
    from accel.core import memory
    from distill.checkpoint import load_denoiser
    from distill.data import load_dataset

    den, _ = load_denoiser(teachers["sd"])
    name = f"imagefolder:{write_imagefolder(tmp_path / 'images', n=5)}"
    whole, _ = load_dataset(name, den, tmp_path / "one")
    monkeypatch.setattr(memory, "DRAW_PIXELS", 2 * 32 * 32)  # two 32 px images per call
    sizes = []
    encode = den.adapter.encode_images
    monkeypatch.setattr(den.adapter, "encode_images", lambda x: sizes.append(len(x)) or encode(x))
    chunked, _ = load_dataset(name, den, tmp_path / "chunked")
    assert sizes == [2, 2, 1]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_digits_with_captions_train_text_to_image_teachers(teachers, tmp_path):
    """``dataset = "digits"`` for a text-to-image teacher: the digits at its resolution and VAE
    channels, captioned in the text teacher's phrasings, VAE-encoded once."""
    from accel.demo.digits import caption, digits_dataset
    from distill.checkpoint import load_denoiser
    from distill.data import load_dataset

    images, captions = digits_dataset((32, 32), 3, captions=True)
    assert images.shape == (1797, 3, 32, 32) and captions[7] == caption(7, 7)
    den, _ = load_denoiser(teachers["sd"])
    x0, cond = load_dataset("digits", den, tmp_path / "cache")
    assert x0.shape == (1797, 4, 16, 16) and cond["encoder_hidden_states"].shape[0] == 1797
    assert len(list((tmp_path / "cache").iterdir())) == 1
