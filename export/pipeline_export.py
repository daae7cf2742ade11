"""ONNX export of a latent pipeline, one graph per component (SD, SDXL, SD3, Flux, PixArt, Sana;
DiT has no text encoder):

- ``text_encoder.onnx``: token ids of each tokenizer (``input_ids``, SDXL's ``input_ids_2``) ->
  the prompt-dependent conditioning the family's adapter computes (``encode_tokens``: SD's last
  hidden state; SDXL's two penultimate hidden states concatenated, and the second encoder's
  projected pooled output ``text_embeds``);
- ``model.onnx``: the denoiser graph (sample, timestep, conditioning by name: SDXL's
  ``text_embeds`` and ``time_ids`` are inputs) -> x0;
- ``vae_decoder.onnx``: latents -> images in [-1, 1], the VAE's scaling (and shift, latents
  mean/std) inside the graph.

Each component is exported with the dynamo exporter, falling back to the TorchScript one when it
fails (the exporter used is recorded per component), with a dynamic batch (and height/width from
a target with a resolution range), weights as external data above 1 GiB, and is proved against
torch by onnxruntime with its optimisations off and on. The tokenizers are written as
``tokenizer.json`` files that the ``tokenizers`` library reads without torch, and checked to give
the ids the pipeline's own tokenizers give; ``conditioning.safetensors`` holds the
prompt-independent inputs (``static.*``: SDXL's size micro-conditions, an LCM student's w
embedding) and classifier-free guidance's null branch (``null.*``). The sampler plan names all of
it (``components``, ``tokenizers``, ``text_outputs``, ``conditioning_file``).
"""

from __future__ import annotations

import gc
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from accel.core.errors import StageError
from accel.core.memory import give_back
from accel.core.plan import PLAN_FILE, SamplerPlan
from accel.core.stage import StageContext

TEXT_FILE = "text_encoder.onnx"
VAE_FILE = "vae_decoder.onnx"
COND_FILE = "conditioning.safetensors"
PROMPTS = [
    "a handwritten seven",
    "",
    "an astronaut riding a horse, " * 12,  # past CLIP's 77 tokens: truncated
    "Ünïcödé prompt ☃ with 123 digits",
]


class TextGraph(nn.Module):
    """Token ids (one tensor per tokenizer) -> the adapter's prompt-dependent conditioning, as a
    tuple in ``names`` order."""

    def __init__(self, adapter, names: list[str]) -> None:
        super().__init__()
        self.adapter, self.names = adapter, names
        encoders = [
            adapter.modules["text_encoder" + n[len("tokenizer") :]] for n in adapter.tokenizer_names
        ]
        self.encoders = nn.ModuleList(encoders)  # registered, so the exporter sees the weights

    def forward(
        self,
        input_ids: torch.Tensor,
        input_ids_2: torch.Tensor | None = None,
        input_ids_3: torch.Tensor | None = None,
    ):
        ids = [i for i in (input_ids, input_ids_2, input_ids_3) if i is not None]
        out = self.adapter.encode_tokens(ids)
        return tuple(out[n] for n in self.names)


class DecodeGraph(nn.Module):
    """Latents (the sampler's layout) -> images in [-1, 1]: the adapter's ``decode``."""

    def __init__(self, adapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.vae = adapter.modules["vae"]

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.adapter.decode(latents)


class ModuleRuntime:
    """torch eager on a component graph, numpy in and out (the parity reference)."""

    def __init__(self, module: nn.Module, outputs: list[str], name: str) -> None:
        self.module, self.outputs, self.name = module.eval(), outputs, f"torch-eager:{name}"

    def inputs(self) -> dict:
        return {}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float().numpy() for n, o in zip(self.outputs, out, strict=True)}


def tokenizer_entries(adapter) -> list[dict]:
    inputs = ["input_ids", "input_ids_2", "input_ids_3"]
    return [
        {
            "folder": name,
            "input": inputs[i],
            "max_length": adapter.token_length(name),
            "pad_id": int(adapter.modules[name].pad_token_id),
            # the prompt clean-up the runtime does before tokenizing (PixArt, Sana)
            **({"lowercase": True} if adapter.normalize_prompts else {}),
            **({"prefix": adapter.prompt_prefix} if adapter.prompt_prefix else {}),
        }
        for i, name in enumerate(adapter.tokenizer_names)
    ]


def write_tokenizers(adapter, out: Path) -> list[dict]:
    """Each tokenizer as ``NAME/tokenizer.json`` (a slow tokenizer converted to the fast form),
    checked to give the pipeline tokenizer's ids on ``PROMPTS``."""
    from accel.runtime.pipeline import PromptTokenizer

    entries = tokenizer_entries(adapter)
    for entry in entries:
        tok = adapter.modules[entry["folder"]]
        (out / entry["folder"]).mkdir()
        file = out / entry["folder"] / "tokenizer.json"
        if getattr(tok, "is_fast", False):
            fast = tok.backend_tokenizer
        else:
            from transformers.convert_slow_tokenizer import convert_slow_tokenizer

            fast = convert_slow_tokenizer(tok)
        fast.save(str(file))
    ours = {}
    for e in entries:
        ours[e["input"]] = PromptTokenizer.of(out, e)
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):  # the long prompt's truncation warnings
        theirs = [ids.numpy() for ids in adapter.tokenize(PROMPTS)]
        mine = [ours[e["input"]](PROMPTS) for e in entries]
    for e, a, b in zip(entries, theirs, mine, strict=True):
        if a.shape != b.shape or not (a == b).all():
            raise StageError(
                "onnx",
                f"{e['folder']}/tokenizer.json tokenizes differently from the pipeline's "
                f"{type(adapter.modules[e['folder']]).__name__}; this tokenizer cannot be exported",
            )
    return entries


def _reason(e: BaseException) -> str:
    """The informative line of an exporter failure: torch.onnx wraps torch.export's error (for
    example diffusers' UNets, whose Upsample2D guard caps a dynamic batch at 63) in a generic
    one."""
    while e.__cause__ is not None and "torch.export" in str(e):
        e = e.__cause__
    return " ".join(str(e).split())[:300]


EXPORTERS = ("dynamo", "dynamo-unoptimized", "legacy")
"""In the order tried. Measured reasons to go on: Sana's DC-AE decoder is NaN in onnxruntime after
the onnxscript optimiser drops its ``+ 1e-15``; dynamo's PixArt transformer is 4.9e-4 off torch at
t = 999 (its x0 divides by alpha = 0.068) where TorchScript's is within 1e-4; T5 and graphs with
Model Optimizer's quantizers export only with TorchScript."""


RELEASE_BYTES = 1 << 30
"""A component whose weights exceed this is released after its torch reference outputs."""


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_component(
    ctx: StageContext,
    name: str,
    module: nn.Module,
    file: str,
    feeds: dict[str, np.ndarray],
    outputs: list[str],
    opset: int,
    spatial,
    parity_feeds: list[dict[str, np.ndarray]],
    unbatched: list[str] | None = None,
    max_batch: int = 1024,
) -> dict:
    """Export ``module`` to ``ctx.out / file`` with the first of ``EXPORTERS`` whose graph loads
    and passes parity (the dynamo exporter; the same without its onnxscript optimiser; the
    TorchScript one); the figures for the stage's metrics."""
    from export.onnx_export import batch_bound, onnx_from_torch, onnx_parity

    path = ctx.out / file
    tried: dict[str, str] = {}
    t0 = time.perf_counter()
    report: dict = {}
    captured = False  # the last exporter wrote a graph (its failure, if any, came after)
    released = False
    asked = max_batch

    def release() -> None:
        module.to("meta")
        give_back()

    for exporter in EXPORTERS:
        if exporter == "dynamo-unoptimized" and "dynamo" in tried and not captured:
            continue  # torch.export itself failed: the optimiser is not the problem
        captured = False
        ctx.progress(f"onnx: exporting the {name} ({exporter} exporter, opset {opset})")
        try:
            kwargs = dict(inputs=feeds, output=outputs, spatial=spatial, unbatched=unbatched or ())
            bound = None
            try:
                onnx_from_torch(module, path, opset, dynamo=exporter != "legacy",
                                optimize=exporter == "dynamo", max_batch=max_batch, **kwargs)  # fmt: skip
            except Exception as e:
                bound = batch_bound(e) if exporter != "legacy" else None
                if bound is None or bound >= max_batch:
                    raise
            if bound is not None:  # retried outside the handler: the failed trace is freed
                gc.collect()
                max_batch = bound  # diffusers' UNets: the same graph, proved for batch <= 63
                ctx.progress(f"onnx: the {name}'s guards bound its batch at {bound}; again")
                onnx_from_torch(module, path, opset, dynamo=True, optimize=exporter == "dynamo",
                                max_batch=max_batch, **kwargs)  # fmt: skip
            gc.collect()
            captured = True
            seconds = time.perf_counter() - t0
            # a graph that onnxruntime cannot load or that disagrees with torch counts as a
            # failed export: the other exporter gets its turn. A module over RELEASE_BYTES is
            # released once torch's outputs are computed (nothing after it needs it), so that
            # its weights and onnxruntime's are never held together.
            released = weight_bytes(module) > RELEASE_BYTES
            reference = ModuleRuntime(module, outputs, name)
            report = onnx_parity(path, reference, parity_feeds, then=release if released else None)
            break
        except Exception as e:  # each exporter fails in its own exception types
            tried[exporter] = _reason(e)
            for leftover in ctx.out.glob(file + "*"):
                leftover.unlink()
            if captured and released:
                raise StageError(
                    "onnx",
                    f"the {exporter} exporter's graph of the {name} fails parity ({tried[exporter]}), "
                    "and its weights were released to keep one copy in memory, so no other "
                    "exporter is tried",
                ) from None
    else:
        raise StageError(
            "onnx",
            f"neither exporter exports the {name}: "
            + "; ".join(f"{k}: {v}" for k, v in tried.items()),
        )
    return {
        "exporter": exporter,
        "failed_exporters": tried,
        "export_seconds": seconds,
        "parity": report,
        "onnx_bytes": sum(p.stat().st_size for p in ctx.out.glob(file + "*")),
        **({"dynamo_max_batch": max_batch} if max_batch != 1024 and exporter != "legacy" else {}),
        **({"batch_bound_found": max_batch} if max_batch < asked else {}),
    }


def export_pipeline(ctx: StageContext, config, graph, plan: SamplerPlan, spatial) -> None:
    """The onnx stage for a text-to-image pipeline (see the module docstring)."""
    from safetensors.numpy import save_file

    from accel.runtime import step_feeds
    from accel.runtime.loop import bounded_batch, plan_timesteps
    from export.onnx_export import MODEL_FILE
    from export.torch_runtime import PipelineRuntime

    adapter = graph.adapter
    text = adapter.conditioning == "text"
    if (text and not adapter.tokenizer_names) or "vae" not in adapter.modules:
        raise StageError(
            "onnx", f"{adapter.family} pipelines do not export yet (text encoder or VAE missing)"
        )
    if config.fused_sampler:
        raise StageError(
            "onnx",
            "fused_sampler exports pixel-space models only; drop it for a text-to-image pipeline",
        )
    h, w = plan.resolution or adapter.default_resolution()
    torch_rt = PipelineRuntime(graph, (h, w))
    rng = np.random.default_rng(0)
    metrics: dict[str, dict] = {}

    # the denoiser's feeds first, through the torch text encoder: a large component is released
    # once exported (export_component), so nothing may need it afterwards
    def denoiser_feeds(n: int, seed: int) -> dict[str, np.ndarray]:
        r = np.random.default_rng(seed)
        x = r.standard_normal((n, *plan.sample_shape)).astype(np.float32)
        t, r = plan_timesteps(plan)
        if text:
            cond = torch_rt.encode([PROMPTS[i % 2] for i in range(n)])
        else:
            cond = torch_rt.encode(labels=np.arange(n) % (plan.num_classes or 1))
        r = None if r is None else np.resize(r, n)  # a flow map's step ends
        return step_feeds(plan, x, np.resize(t, n), cond, null, r)

    null = torch_rt.null_conditioning()
    adapter.prepare_export(graph.backbone)
    # parity batches bounded as draws are (at most 2 of SD1.5's 512 px images: onnxruntime without
    # its optimisations holds unfused attention, 0.5 GB per image per score tensor)
    batches = [min(b, max(2, bounded_batch(plan, b))) for b in config.parity_batch_sizes]
    den_feeds = [denoiser_feeds(b, i) for i, b in enumerate(batches)]
    den_example = denoiser_feeds(2, 7)

    # the text encoder (class-conditional latent models, DiT: none)
    entries: list[dict] = []
    names: list[str] = []
    if text:
        entries = write_tokenizers(adapter, ctx.out)
        names = list(adapter.encode_tokens(adapter.tokenize([""])))

        def tokens(prompts: list[str]) -> dict[str, np.ndarray]:
            ids = adapter.tokenize(prompts)
            return {e["input"]: i.numpy() for e, i in zip(entries, ids, strict=True)}

        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            text_feeds = [tokens(PROMPTS[:1]), tokens(PROMPTS[1:])]
        metrics["text_encoder"] = export_component(
            ctx, "text encoder", TextGraph(adapter, names), TEXT_FILE, tokens(PROMPTS[:2]),
            names, config.opset, None, text_feeds,
        )  # fmt: skip

    # the denoiser
    metrics["denoiser"] = export_component(
        ctx, f"denoiser ({type(graph.backbone).__name__})", graph, MODEL_FILE,
        den_example, ["x0"], config.opset, spatial, den_feeds,
        [k for k in plan.conditioning if not plan.is_batched(k)], adapter.export_max_batch,
    )  # fmt: skip

    # the VAE decoder
    vae = DecodeGraph(adapter)
    vae_spatial = None if spatial is None else (spatial[0], spatial[1], spatial[2])
    latents = [
        {"latents": rng.standard_normal((b, *plan.sample_shape)).astype(np.float32)}
        for b in [2, *batches]
    ]  # exported at batch 2 (torch.export specialises a batch of 1)
    metrics["vae_decoder"] = export_component(
        ctx, "VAE decoder", vae, VAE_FILE, latents[0], ["images"], config.opset, vae_spatial,
        latents[1:],
    )  # fmt: skip

    # prompt-independent conditioning and the null branch
    with torch.inference_mode():
        static = adapter.static_conditioning(1, h, w)
    arrays = {f"static.{k}": v.float().numpy() for k, v in static.items()}
    arrays.update({f"null.{k}": np.ascontiguousarray(v) for k, v in (null or {}).items()})
    if arrays:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(ctx.out / COND_FILE))
    plan = replace(
        plan,
        components={**({"text_encoder": TEXT_FILE} if text else {}), "vae_decoder": VAE_FILE},
        tokenizers=entries,
        text_outputs=names,
        conditioning_file=COND_FILE if arrays else None,
    )
    plan.save(ctx.out / PLAN_FILE)
    ctx.metrics.update(
        components=metrics,
        export_seconds=sum(m["export_seconds"] for m in metrics.values()),
        parity=metrics["denoiser"]["parity"],
        onnx_bytes=sum(p.stat().st_size for p in ctx.out.rglob("*") if p.is_file()),
    )
    ctx.info.update(
        pipeline=True,
        exporters={k: m["exporter"] for k, m in metrics.items()},
        resolution=[h, w],
    )


def component_feeds(root: Path, plan: SamplerPlan, batches: list[int], seed: int = 0) -> dict:
    """Parity feeds of each component graph of the pipeline in ``root``: the prompts' token ids
    (``tokenizer.json`` files, as the runtime tokenizes) and Gaussian latents, per batch size."""
    from accel.runtime.pipeline import PromptTokenizer

    rng = np.random.default_rng(seed)
    prompts = ["a handwritten seven", "", "a photo of a cat"]
    tokenizers = [(t["input"], PromptTokenizer.of(root, t)) for t in plan.tokenizers]
    return {
        "text_encoder": [
            {name: tok([prompts[i % 3] for i in range(b)]) for name, tok in tokenizers}
            for b in batches
        ]
        if tokenizers
        else [],
        "vae_decoder": [
            {"latents": rng.standard_normal((b, *plan.sample_shape)).astype(np.float32)}
            for b in batches
        ],
    }
