"""A text-to-image pipeline of engines, run with numpy and no torch: prompt -> token ids (the
``tokenizers`` library, from the ``tokenizer.json`` files the export stage wrote) -> text-encoder
engine (its outputs cached per prompt) -> the denoiser engine in the sampler loop -> VAE-decoder
engine -> images. The sampler plan names the files (``components``, ``tokenizers``,
``conditioning_file``); ``PipelineEngines`` speaks the runtime interface the loop uses
(``inputs``, ``infer``, ``encode``, ``null_conditioning``, ``decode``)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from accel.core.errors import CheckpointError
from accel.core.plan import SamplerPlan
from accel.runtime.loop import Runtime

CACHE_PROMPTS = 1024  # text-encoder outputs kept per prompt (least recently used dropped)


class PromptTokenizer:
    """One ``tokenizer.json`` with the pipeline's padding and truncation: every prompt becomes
    ``max_length`` ids, as the stock pipelines tokenize (``padding="max_length"``,
    ``truncation=True``); a prompt that loses tokens is named in a warning."""

    def __init__(
        self,
        folder: Path,
        max_length: int,
        pad_id: int,
        lowercase: bool = False,
        prefix: str = "",
    ) -> None:
        from tokenizers import Tokenizer

        file = folder / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"tokenizer file not found: {file}; re-export the pipeline")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception on a corrupt file
            raise CheckpointError(f"{file} is not a valid tokenizer: {str(e)[:200]}") from None
        tok.enable_truncation(max_length)
        tok.enable_padding(length=max_length, pad_id=pad_id)
        self.tokenizer, self.max_length = tok, max_length
        self.lowercase, self.prefix = lowercase, prefix

    @classmethod
    def of(cls, root: Path, entry: dict) -> PromptTokenizer:
        """The tokenizer a sampler plan's ``tokenizers`` entry names, under ``root``."""
        return cls(
            root / entry["folder"], entry["max_length"], entry["pad_id"],
            entry.get("lowercase", False), entry.get("prefix", ""),
        )  # fmt: skip

    def __call__(self, prompts: list[str]) -> np.ndarray:
        from accel.core.stage import say

        check_prompts(prompts)
        if self.lowercase:  # the pipeline's clean-up without bs4/ftfy (PixArt, Sana)
            prompts = [p.lower().strip() for p in prompts]
        encodings = self.tokenizer.encode_batch([self.prefix + p for p in prompts])
        for prompt, enc in zip(prompts, encodings, strict=True):
            if enc.overflowing:
                shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
                say(
                    f"warning: the prompt {shown!r} is longer than the text encoder's "
                    f"{self.max_length} tokens; the rest is dropped"
                )
        return np.array([e.ids for e in encodings], dtype=np.int64)


def check_prompts(prompts: list[str]) -> None:
    """Prompts are text: ValueError naming the first that is not a string of Unicode characters
    (a lone surrogate is how Python hands over bytes that were not UTF-8: command-line arguments,
    JSON escapes)."""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} is a {type(prompt).__name__}, not text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"prompt {i} is not valid text: {prompt[e.start : e.end]!r} at character "
                f"{e.start} is not a Unicode character (bytes that were not UTF-8?); pass UTF-8 text"
            ) from None


class PipelineEngines:
    """The denoiser's runtime plus the text-encoder and VAE-decoder runtimes, tokenizers and the
    stored conditioning (prompt-independent inputs, the null branch) of a pipeline's plan."""

    def __init__(
        self, root: Path, plan: SamplerPlan, denoiser: Runtime, open_component: Callable
    ) -> None:
        text = plan.conditioning_kind == "text"
        roles = ("text_encoder", "vae_decoder") if text else ("vae_decoder",)
        missing = [r for r in roles if r not in plan.components]
        if missing or (text and not plan.tokenizers):
            raise CheckpointError(
                f"{root}: the sampler plan of this latent pipeline names no "
                f"{', '.join(missing) or 'tokenizers'}; re-export it"
            )
        self.plan, self.denoiser = plan, denoiser
        self.tokenizers = [(t["input"], PromptTokenizer.of(root, t)) for t in plan.tokenizers]
        self.static: dict[str, np.ndarray] = {}
        self.null: dict[str, np.ndarray] = {}
        if plan.conditioning_file:
            for key, value in _load_arrays(root / plan.conditioning_file).items():
                kind, _, name = key.partition(".")
                {"static": self.static, "null": self.null}[kind][name] = value
        self.text: Runtime | None = (
            open_component(plan.components["text_encoder"]) if text else None
        )
        self.vae: Runtime = open_component(plan.components["vae_decoder"])
        self._cache: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()
        self.name = f"pipeline:{denoiser.name}"

    def inputs(self) -> dict[str, tuple[list, str]]:
        return self.denoiser.inputs()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.denoiser.infer(feeds)

    def tokenize(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {name: tok(prompts) for name, tok in self.tokenizers}

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The denoiser's conditioning for ``prompts``: the text engine's outputs (computed once
        per distinct prompt and cached), then the stored prompt-independent inputs."""
        with self._lock:  # the text encoder is cheap beside the loop: one caller at a time
            new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
            if new:
                if self.text is None:
                    raise CheckpointError(
                        f"this {self.plan.family} pipeline is class-conditional: give labels"
                    )
                out = self.text.infer(self.tokenize(new))
                for i, prompt in enumerate(new):
                    self._cache[prompt] = {k: out[k][i : i + 1] for k in self.plan.text_outputs}
            rows = [self._cache[p] for p in prompts]
            for p in prompts:
                self._cache.move_to_end(p)
            while len(self._cache) > CACHE_PROMPTS:
                self._cache.popitem(last=False)
        cond = {k: np.concatenate([r[k] for r in rows]) for k in self.plan.text_outputs}
        return self._with_static(cond, len(prompts))

    def _with_static(self, cond: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        for name, value in self.static.items():
            if self.plan.is_batched(name):
                value = np.broadcast_to(value, (n, *value.shape[1:]))
            cond[name] = np.ascontiguousarray(value)
        return cond

    def null_conditioning(self) -> dict[str, np.ndarray] | None:
        return dict(self.null) or None

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.vae.infer({"latents": latents.astype(np.float32)})["images"]


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise CheckpointError(f"conditioning file not found: {path}; re-export the pipeline")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None


def open_pipeline(
    root: Path, plan: SamplerPlan, denoiser: Runtime, open_component: Callable[[str], Runtime]
) -> Runtime:
    """``denoiser`` alone, or with the pipeline's other engines where the plan names them."""
    if not plan.components:
        return denoiser
    return PipelineEngines(root, plan, denoiser, open_component)


def copy_pipeline_files(
    src: Path, dst: Path, plan: SamplerPlan, roles: list[str] | None = None
) -> None:
    """A pipeline's files besides the denoiser's graph and the plan, from ``src`` to ``dst``: the
    tokenizer folders, the conditioning file and the component graphs of ``roles`` (default:
    all) with their external data."""
    import shutil

    for tok in plan.tokenizers:
        shutil.copytree(src / tok["folder"], dst / tok["folder"])
    if plan.conditioning_file:
        shutil.copy(src / plan.conditioning_file, dst / plan.conditioning_file)
    for role, file in plan.components.items():
        if roles is None or role in roles:
            for part in src.glob(file + "*"):
                shutil.copy(part, dst / part.name)
