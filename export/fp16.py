"""FP16 conversion of an exported ONNX graph for GPU targets (Micikevicius et al. 2018, "Mixed
Precision Training": keep in fp32 what fp16's 10-bit mantissa and 65504 range would break).

Model Optimizer's AutoCast (``modelopt.onnx.autocast.convert_to_mixed_precision``) rewrites the
graph with Cast nodes at the precision boundaries. What stays fp32:

- the graph's inputs and outputs (``keep_io_types``), so runtimes and the sampler plan feed and
  read float32 as before;
- normalisations and softmax (``keep_fp32_ops``): their reductions over many elements lose the
  most in fp16;
- the sampler arithmetic: every node outside the diffusers backbone, i.e. the alpha/sigma tables
  and the x0 conversion of ``DenoiserGraph`` and, in a fused sampler, the per-step updates and
  guidance. The dynamo exporter records each node's module scope
  (``pkg.torch.onnx.name_scopes``), the TorchScript exporter names nodes by module path: that is
  how those nodes are found.

A pipeline's text encoder and VAE decoder (``components``) are converted whole (but for the same
op types) and kept in fp16 only where the quality gate allows; otherwise they stay fp32.

Each converted graph proves parity against its fp32 parent with the fp16 row of the tolerance
table, and the pipeline passes the quality gate. The denoiser's parity is judged where the converted
nodes end: at the backbone's outputs, where they enter the fp32 sampler arithmetic (``boundary``).
Its x0 output is that prediction put through an exact fp32 conversion that multiplies any error:
x0 = (x - sigma eps) / alpha scales an epsilon error by sigma / alpha, 15x at t = 999 for SD's
schedule. Judged at x0, the same graph passes where onnxruntime upcasts fp16 kernels to fp32 (AVX2
and AVX-512 without FP16) and fails where it runs them natively (AVX512-FP16: 0.041 max abs error
in x0, 0.003 in epsilon); x0's statistics are reported beside. fp16 brings no speed on CPU
(../shared/FACTS.md); it is meant for CUDA targets.
"""

from __future__ import annotations

import ast
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import Field

from accel.core.errors import StageError
from accel.core.stage import StageConfig, StageContext
from export.onnx_export import save_graph
from export.onnx_pass import OnnxPass, pass_stage
from export.quality_gate import GateConfig, quality_gate

SCOPES = "pkg.torch.onnx.name_scopes"


class Fp16Config(StageConfig):
    keep_fp32_ops: list[str] = Field(
        ["InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax"]
    )
    """ONNX op types that stay fp32 (reductions that lose most in fp16)."""
    components: list[Literal["denoiser", "text_encoder", "vae_decoder"]] = Field(
        ["denoiser"], min_length=1
    )
    """A pipeline's graphs to convert, in order. The denoiser must pass parity and the gate (or
    the stage fails); a text encoder or VAE decoder is kept in fp16 only if the gate, sampled
    with it and the components accepted before it, passes, and otherwise stays fp32."""
    gate: GateConfig = GateConfig()
    """The quality gate against the fp32 parent (``export.quality_gate.GateConfig``)."""


def outside_backbone(model) -> list[str]:
    """Names of the nodes that the exporter did not place inside a ``backbone`` module. The
    dynamo exporter records module scopes in each node's metadata (a node its optimiser made has
    none: it is inside when every node it reads from is); the TorchScript exporter names nodes by
    module path (``/graph/backbone/conv_in/Conv``). A graph with neither (a pass such as
    onnxslim dropped them) is refused."""
    nodes = [n for n in model.graph.node if n.name]
    if any(p.key == SCOPES for n in nodes for p in n.metadata_props):
        producer = {o: n for n in model.graph.node for o in n.output}
        placed: dict[str, bool] = {}

        def inside(node) -> bool:
            meta = {p.key: p.value for p in node.metadata_props}
            if SCOPES in meta:
                scopes = ast.literal_eval(meta[SCOPES])
                placed[node.name] = any(s.split(".")[-1] == "backbone" for s in scopes)
            else:  # a node the optimiser made (a Split of a GEGLU's chunk): where its inputs are
                sources = [producer[i] for i in node.input if i in producer]
                placed[node.name] = bool(sources) and all(
                    placed.get(src.name, False) for src in sources
                )
            return placed[node.name]

    elif any("/backbone/" in n.name for n in nodes):

        def inside(node) -> bool:
            return "/backbone/" in node.name

    else:
        raise StageError(
            "fp16",
            "the graph carries no module scopes (a pass such as onnxslim dropped them), so the "
            "sampler arithmetic cannot be kept in fp32; run fp16 directly after the onnx stage",
        )
    return [n.name for n in nodes if not inside(n)]


BOUNDARY = "fp16_boundary_"


def boundary(model, keep: list[str]) -> list[tuple[str, int]]:
    """(node name, input index) of every input of a node in ``keep`` (the fp32 sampler
    arithmetic) that a converted node computes: where the backbone's outputs enter it."""
    kept = set(keep)
    producer = {o: n.name for n in model.graph.node for o in n.output}
    return [
        (n.name, i)
        for n in model.graph.node
        if n.name in kept
        for i, name in enumerate(n.input)
        if name in producer and producer[name] not in kept
    ]


@contextmanager
def exposed(path: Path, inputs: list[tuple[str, int]], model=None) -> Iterator[Path]:
    """The graph at ``path`` (``model``: its proto, loaded without external data, if the caller
    has it; it is changed) with one more output per (node, input index) of ``inputs``
    (``fp16_boundary_<k>``, float32: in a converted graph, the Cast that AutoCast puts before the
    fp32 node), written to a temp dir beside links to its external data (no weights copied)."""
    import onnx
    from onnx import TensorProto, helper

    if not inputs:
        yield path
        return
    if model is None:
        model = onnx.load(str(path), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    for k, (name, index) in enumerate(inputs):
        if name not in nodes:
            raise StageError("fp16", f"the converted graph lost node {name!r}; cannot check it")
        out = BOUNDARY + str(k)
        model.graph.node.append(
            helper.make_node("Identity", [nodes[name].input[index]], [out], name=out)
        )
        model.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory(prefix="accel-fp16-") as tmp:
        data = {
            e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
        }
        for name in data:
            (Path(tmp) / name).symlink_to((path.parent / name).resolve())
        onnx.save_model(model, str(Path(tmp) / path.name))
        yield Path(tmp) / path.name


def convert(src: Path, dst: Path, keep_nodes: list[str], keep_ops: list[str]):
    """``src`` converted to fp16 by AutoCast, IO fp32, into ``dst``; the converted model."""
    from modelopt.onnx.autocast import convert_to_mixed_precision

    from export.quantize_onnx import quiet_modelopt

    quiet_modelopt()
    exclude = ["^(" + "|".join(map(re.escape, keep_nodes)) + ")$"] if keep_nodes else None
    converted = convert_to_mixed_precision(
        str(src),
        "fp16",
        nodes_to_exclude=exclude,
        op_types_to_exclude=keep_ops,
        keep_io_types=True,
    )
    # AutoCast's value_info carries the example batch's shapes, which onnxruntime's fusions then
    # trust over the dynamic batch: let the runtime infer shapes itself
    del converted.graph.value_info[:]
    save_graph(converted, dst)
    return converted


def run(ctx: StageContext) -> None:
    config: Fp16Config = ctx.config  # type: ignore[assignment]
    import onnx

    if ctx.input.info.get("precision") in ("int8", "fp8"):
        raise StageError(
            "fp16",
            "the graph is already quantized; convert to fp16 first, or quantize with "
            'high_precision_dtype = "fp16"',
        )
    src_dir, out_dir = ctx.input.path, ctx.out
    # every graph copied fp32, until a component is converted
    graph_pass = OnnxPass(ctx, "fp16", config.components, copy_rewritten=True)
    parent = graph_pass.pipeline(src_dir, optimize=True)
    results: dict[str, dict] = {}
    gate: dict = {}
    for component in config.components:
        file = graph_pass.files[component]
        # the denoiser graph's sampler arithmetic (alpha/sigma tables, the x0 conversion, a fused
        # sampler's updates) stays fp32; a text encoder or VAE decoder is all backbone
        graph = onnx.load(str(src_dir / file), load_external_data=False)
        keep = outside_backbone(graph) if component == "denoiser" else []
        edges = boundary(graph, keep)
        judged = {BOUNDARY + str(k) for k in range(len(edges))} or None
        t0 = time.perf_counter()
        ctx.progress(f"fp16: converting the {component}; {len(keep)} nodes stay fp32")
        converted = convert(src_dir / file, out_dir / file, keep, config.keep_fp32_ops)
        seconds = time.perf_counter() - t0
        with (
            exposed(src_dir / file, edges, graph) as ref_path,
            exposed(out_dir / file, edges) as path,
        ):
            report, failure = graph_pass.parity(component, ref_path, path, "fp16", judged, "fp16")
        try:
            if failure:
                raise StageError("fp16", failure)
            gate = quality_gate(
                "fp16",
                config.gate,
                parent,
                graph_pass.pipeline(out_dir, optimize=True),
                ctx.progress,
                batch=ctx.target.draw_batch,
            )
        except StageError as e:
            if component == "denoiser":
                raise
            ctx.progress(f"fp16: the {component} stays fp32 ({e.message})")
            graph_pass.restore(component)
            results[component] = {"precision": "fp32", "refused": e.message, "parity": report}
            continue
        types = {onnx.TensorProto.FLOAT16: 0, onnx.TensorProto.FLOAT: 0}
        for t in converted.graph.initializer:
            if t.data_type in types:
                types[t.data_type] += 1
        results[component] = {
            "precision": "fp16",
            "convert_seconds": seconds,
            "parity": report,
            "fp32_nodes_kept": len(keep),
            "initializers": {
                "fp16": types[onnx.TensorProto.FLOAT16],
                "fp32": types[onnx.TensorProto.FLOAT],
            },
        }
    if not any(r["precision"] == "fp16" for r in results.values()):
        raise StageError(
            "fp16",
            "the gate refused fp16 for every component ("
            + "; ".join(f"{c}: {r['refused']}" for c, r in results.items())
            + "); no artifact was written",
        )
    ctx.metrics.update(quality_gate=gate, components=results)
    if "denoiser" in results:  # the single-graph figures, where they were before
        ctx.metrics.update({k: v for k, v in results["denoiser"].items() if k != "precision"})
    ctx.info.update(precision="fp16")
    if graph_pass.plan.components:
        ctx.info["component_precision"] = {
            c: results[c]["precision"] if c in results else ctx.input.info.get("precision", "fp32")
            for c in graph_pass.files
        }


STAGE = pass_stage(
    "fp16",
    version=3,
    config=Fp16Config,
    run=run,
    description="convert the ONNX graph (a pipeline's components where the gate allows) to "
    "fp16, keeping IO, normalisations and sampler arithmetic in fp32",
)
