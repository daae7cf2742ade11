"""Triton Inference Server Python-backend model: the few-step sampler loop over the denoiser
model, called through Triton's business-logic scripting (BLS). `accel deploy triton` copies this
file into the repository as ``<name>/1/model.py`` beside the bundle's ``sampler_plan.json``.

The loop is accel's own (``accel.runtime.sample``), so the Triton model samples exactly what
``accel.runtime.Bundle`` samples. Triton's Python environment needs numpy and accel
(``pip install --no-deps accel``: the runtime imports neither torch nor diffusers).

Inputs: ``noise`` (N x C x H x W float32), ``class_labels`` (N int64; class-conditional models)
or ``prompt`` (N strings; text-to-image pipelines, whose text encoder and VAE decoder are models
of their own, called through BLS too, with the bundle's tokenizers beside this file) and ``seed``
(1 int64; the fresh noise of stochastic steps). Output: ``images``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from accel.core.plan import PLAN_FILE, SamplerPlan
from accel.runtime import infer_in_chunks, run_pipeline


class TritonDenoiser:
    """accel's Runtime interface over a BLS call to the denoiser model."""

    def __init__(
        self, model_name: str, inputs: list[str], max_batch: int, outputs: list[str] | None = None
    ) -> None:
        self.model_name, self._inputs, self.name = model_name, inputs, f"triton:{model_name}"
        self.max_batch, self.outputs = max_batch, outputs or ["x0"]

    def inputs(self) -> dict[str, tuple[list, str]]:
        return {n: (["batch"], "") for n in self._inputs}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Calls of more rows than the denoiser's max_batch_size go in chunks."""
        return infer_in_chunks(self._infer, feeds, self.max_batch)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # per-example scalars (timestep, label, w) are dims [1] reshaped to [] in the denoiser's
        # config: a request sends them as N x 1
        request = pb_utils.InferenceRequest(
            model_name=self.model_name,
            requested_output_names=self.outputs,
            # a GPU denoiser's output comes back in host memory, where as_numpy() can read it
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
            inputs=[
                pb_utils.Tensor(k, v.reshape(-1, 1) if v.ndim == 1 else v)
                for k, v in feeds.items()
                if k in self._inputs
            ],
        )
        response = request.exec()
        if response.has_error():
            raise pb_utils.TritonModelException(response.error().message())
        return {k: pb_utils.get_output_tensor_by_name(response, k).as_numpy() for k in self.outputs}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        here = Path(args["model_repository"]) / args["model_version"]
        self.plan = SamplerPlan.load(here / PLAN_FILE)
        params = json.loads(args["model_config"]).get("parameters", {})
        denoiser = params["denoiser_model"]["string_value"]
        inputs = params["denoiser_inputs"]["string_value"].split(",")
        max_batch = int(params["denoiser_max_batch"]["string_value"])
        self.denoiser = TritonDenoiser(denoiser, inputs, max_batch)
        self.runtime = self.denoiser
        if self.plan.components:  # a pipeline: tokenizers here, text encoder and VAE via BLS
            from accel.runtime.pipeline import PipelineEngines

            plan = self.plan
            batch = int(params["component_max_batch"]["string_value"])
            models = {
                file: (params[f"{role}_model"]["string_value"], role)
                for role, file in plan.components.items()
            }
            io = {
                "text_encoder": ([t["input"] for t in plan.tokenizers], plan.text_outputs),
                "vae_decoder": (["latents"], ["images"]),
            }

            def open_component(file: str) -> TritonDenoiser:
                model, role = models[file]
                return TritonDenoiser(model, io[role][0], batch, io[role][1])

            self.runtime = PipelineEngines(here, plan, self.denoiser, open_component)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                noise = pb_utils.get_input_tensor_by_name(request, "noise").as_numpy()
                labels_t = pb_utils.get_input_tensor_by_name(request, "class_labels")
                prompt_t = pb_utils.get_input_tensor_by_name(request, "prompt")
                seed_t = pb_utils.get_input_tensor_by_name(request, "seed")
                labels = None if labels_t is None else labels_t.as_numpy().astype(np.int64)
                prompts = None
                if prompt_t is not None:  # TYPE_STRING arrives as bytes objects
                    prompts = [
                        p.decode("utf-8") if isinstance(p, bytes) else str(p)
                        for p in prompt_t.as_numpy().reshape(-1)
                    ]
                seed = 0 if seed_t is None else int(seed_t.as_numpy().reshape(-1)[0])
                images = run_pipeline(
                    self.runtime, self.plan, noise.astype(np.float32), prompts, labels,
                    np.random.default_rng(seed),
                )  # fmt: skip
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("images", images)])
                )
            except Exception as e:  # one bad request must not fail the others in the batch
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(str(e))
                    )
                )
        return responses
