"""The shape every ONNX-to-ONNX pass (``optimize``, ``fp16``, ``quantize``) shares, after onnx-ir's
passes: read the parent's sampler plan, check the graphs the pass rewrites (``components``: the
denoiser, a pipeline's text encoder and VAE decoder) against it, copy everything else as it is
(the plan, tokenizers, the conditioning file, the graphs it leaves alone), compare each rewritten
graph with its original on the same feeds (``export.parity``), and open the parent's and the
output's whole pipeline for the quality gate."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from accel.core.errors import CheckpointError, StageError
from accel.core.plan import PLAN_FILE, SamplerPlan
from accel.core.stage import Stage, StageConfig, StageContext
from export.onnx_export import MODEL_FILE

PARITY_BATCHES = [1, 3]  # an odd batch too: catches a batch axis a rewrite made static


class OnnxPass:
    """One run of the pass ``stage`` from ``ctx.input`` into ``ctx.out``, rewriting
    ``components``; on return, ``ctx.out`` holds the plan and every file the pass does not
    rewrite (``copy_rewritten``: the rewritten ones too, until the pass overwrites them)."""

    def __init__(
        self,
        ctx: StageContext,
        stage: str,
        components: Sequence[str] = ("denoiser",),
        copy_rewritten: bool = False,
    ) -> None:
        from accel.runtime.pipeline import copy_pipeline_files

        self.stage, self.src, self.out = stage, ctx.input.path, ctx.out
        self.plan = SamplerPlan.load(self.src / PLAN_FILE)
        self.files = {"denoiser": MODEL_FILE, **self.plan.components}
        unknown = [c for c in components if c not in self.files]
        if unknown:
            raise StageError(
                stage,
                f"this graph has no {', '.join(unknown)} (it has {', '.join(self.files)}); "
                "set components accordingly",
            )
        self.components = list(components)
        shutil.copy(self.src / PLAN_FILE, self.out / PLAN_FILE)
        kept = [r for r in self.plan.components if copy_rewritten or r not in components]
        copy_pipeline_files(self.src, self.out, self.plan, kept)
        if copy_rewritten or "denoiser" not in components:
            self.restore("denoiser")
        self._feeds: dict[str, list[dict]] | None = None

    def restore(self, component: str) -> None:
        """``component``'s graph in the output as it was in the input (external data too)."""
        file = self.files[component]
        for part in self.out.glob(file + "*"):
            part.unlink()
        for part in self.src.glob(file + "*"):
            shutil.copy(part, self.out / part.name)

    def pipeline(self, root: Path, optimize: bool = True) -> tuple:
        """(runtime, plan) of the whole pipeline in ``root`` (the input or the output) in
        onnxruntime, for the quality gate; a graph that does not load is a ``StageError``."""
        from accel.runtime import OrtRuntime
        from accel.runtime.pipeline import open_pipeline

        try:
            denoiser = OrtRuntime(root / MODEL_FILE, optimize=optimize)
            runtime = open_pipeline(
                root, self.plan, denoiser, lambda f: OrtRuntime(root / f, optimize=optimize)
            )
        except CheckpointError as e:
            raise StageError(self.stage, str(e)) from None
        return runtime, self.plan

    def feeds(self, component: str, inputs: dict) -> list[dict]:
        """Parity feeds of ``component`` (a graph with ``inputs``): the sampler plan's for the
        denoiser, tokenized prompts and Gaussian latents for the others."""
        from export.parity import plan_feeds
        from export.pipeline_export import component_feeds

        if component == "denoiser":
            return plan_feeds(self.plan, inputs, PARITY_BATCHES)
        if self._feeds is None:
            self._feeds = component_feeds(self.src, self.plan, PARITY_BATCHES)
        return self._feeds[component]

    def parity(
        self,
        component: str,
        reference: Path,
        candidate: Path,
        precision: str,
        judged: set[str] | None = None,
        label: str = "rewritten",
    ) -> tuple[dict, str | None]:
        """Compare the graph ``candidate`` with ``reference`` (onnxruntime, its optimisers off, so
        that they cannot hide a rewrite's bug) on ``component``'s feeds: the report, and why it
        failed (the worst errors) or None."""
        from accel.runtime import OrtRuntime
        from export.parity import compare, describe_failure

        try:
            ref = OrtRuntime(reference, optimize=False)
            new = OrtRuntime(candidate, optimize=False)
        except CheckpointError as e:
            raise StageError(self.stage, str(e)) from None
        new.name += f":{label}"
        report = compare(ref, [new], self.feeds(component, ref.inputs()), precision, judged)
        if report["passed"]:
            return report, None
        return report, f"the {label} {component} disagrees with its original: " + describe_failure(
            report
        )

    def check_parity(self, *args, **kwargs) -> dict:
        """``parity``, a disagreement being a ``StageError``."""
        report, failure = self.parity(*args, **kwargs)
        if failure:
            raise StageError(self.stage, failure)
        return report


def pass_stage(
    name: str, *, version: int, config: type[StageConfig], run, description: str
) -> Stage:
    """The ``Stage`` of an ONNX-to-ONNX pass: it consumes an ONNX artifact and makes one."""
    return Stage(
        name=name,
        version=version,
        config=config,
        consumes="onnx",
        produces="onnx",
        run=run,
        description=description,
    )
