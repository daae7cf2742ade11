"""Run a recipe: source checkpoint, then each stage, skipping every stage whose key is stored."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from accel.core.artifact import Artifact, Store
from accel.core.errors import AccelError, StageError
from accel.core.memory import PeakMemory, note_stage
from accel.core.stage import Stage, StageConfig, StageContext, say
from accel.core.target import Target
from accel.processes import Processes
from accel.recipe import Recipe, StagePlan, parent_position, plan_keys, stage_key


@dataclass
class PlannedStage:
    plan: StagePlan
    key: str
    hit: bool


def plan(recipe: Recipe, store: Store) -> tuple[Artifact, list[PlannedStage]]:
    """The source artifact and, per stage, its key and whether the store already holds it."""
    source = store.source(recipe.source)
    return source, [
        PlannedStage(p, k, store.has(k))
        for p, k in zip(recipe.stages, plan_keys(recipe, source.key), strict=True)
    ]


def _check_capabilities(stage, parent: Artifact) -> None:
    """A stage refuses, before anything is written, a checkpoint without a capability it requires
    (``Stage.requires``: asked of the model's adapter, never of its family's name)."""
    if stage.consumes != "checkpoint" or parent.kind != "checkpoint":
        return
    from distill.models import CAPABILITIES, capabilities_of

    family, capabilities = capabilities_of(parent.path)
    missing = [CAPABILITIES[c] for c in stage.requires if c not in capabilities]
    if missing:
        raise StageError(
            stage.name,
            f"{family} models are not supported by this stage yet: it needs "
            f"{' and '.join(missing)}; `accel sample` and `accel profile` run every family in "
            "eager torch",
        )


def run_stage(
    planned: PlannedStage,
    parent: Artifact,
    target: Target,
    store: Store,
    completed: list[str],
    progress: Callable[[str], None] = say,
    resume: bool = False,
) -> Artifact:
    """Run one stage into a pending artifact; any failure leaves the store as it was, apart from
    the stage's work dir (training checkpoints), which ``resume`` continues from. Under
    ``accelerate launch`` process 0 writes the artifact and the others get it from the store."""
    _check_capabilities(planned.plan.stage, parent)
    procs = Processes()
    if procs.is_main:
        stage = planned.plan.stage.name

        def waiting(holder: str) -> None:
            progress(f"{stage}: waiting for {holder}, which is computing it ({planned.key})")

        try:
            with store.claim(planned.key, waiting):
                if store.has(planned.key):  # computed by the run we waited for
                    progress(f"{stage}: computed meanwhile by another run ({planned.key})")
                    artifact = store.get(planned.key)
                else:
                    artifact = _run_and_commit(
                        planned, parent, target, store, completed, progress, resume
                    )
        except StageError as e:
            procs.agree(e.message)
            raise
        procs.agree(None)
        return artifact
    local: str | None = None  # this process's own failure, if process 0 reports none
    if planned.plan.stage.data_parallel:
        store.tmp.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=store.tmp) as scratch:  # its output is process 0's
            ctx = _context(planned, parent, target, store, Path(scratch), {}, {}, progress, resume)
            try:
                planned.plan.stage.run(ctx)
            except StageError as e:
                local = e.message
            except AccelError as e:
                local = str(e)
    message = procs.agree(None) or local
    if message is not None:
        raise StageError(planned.plan.stage.name, message, completed)
    return store.get(planned.key)


def _context(
    planned: PlannedStage,
    parent: Artifact,
    target: Target,
    store: Store,
    out: Path,
    metrics: dict,
    info: dict,
    progress: Callable[[str], None],
    resume: bool,
) -> StageContext:
    return StageContext(
        input=parent,
        config=planned.plan.config,
        target=target,
        out=out,
        metrics=metrics,
        info=info,
        store=store,
        progress=progress,
        work=store.work_dir(planned.key),
        resume=resume,
    )


# how the libraries say an allocation failed: numpy's MemoryError, onnxruntime's "Failed to
# allocate memory" / "bad allocation" (its RuntimeException, a RuntimeError), torch's CPU
# allocator ("DefaultCPUAllocator: not enough memory", "can't allocate memory") and CUDA's
# OutOfMemoryError ("CUDA out of memory")
_ALLOCATION = ("failed to allocate", "bad allocation", "not enough memory",
               "can't allocate memory", "out of memory", "std::bad_alloc")  # fmt: skip


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (of numpy, onnxruntime or torch)."""
    if isinstance(error, MemoryError):
        return True
    return any(s in str(error).lower() for s in _ALLOCATION)


def memory_tries(config, target: Target) -> str:
    """What of a stage's inputs sets its memory, cheapest first: the end of its out-of-memory
    message (and of the line a watched run's parent prints when the kernel kills it)."""
    fields = type(config).model_fields
    tries = []
    if "lora_rank" in fields and not config.lora_rank:
        tries.append("a LoRA student (lora_rank = 64: one frozen base, not three networks)")
    if "base_dtype" in fields and config.lora_rank and config.base_dtype == "fp32":
        tries.append('base_dtype = "bf16" (the frozen base in half precision)')
    if "gradient_checkpointing" in fields and not config.gradient_checkpointing:
        tries.append("gradient_checkpointing = true")
    if "batch_size" in fields:
        tries.append(f"a smaller batch_size (now {config.batch_size})")
    else:
        b = target.shapes.batch
        tries.append(
            f"a smaller [shapes] batch max in the target (now {b.max}: gates, calibration and "
            "engines draw in batches of it)"
        )
    if "resolution" in fields or target.shapes.resolution.max > 64:
        tries.append("a lower resolution")
    tries.append("a machine with more memory")
    return "try " + "; ".join(tries)


def memory_message(stage, config, target: Target, error: BaseException, peak) -> str:
    """The one-line out-of-memory error of ``stage``: the allocation that failed (where the
    allocator says), the peak so far against the machine's memory, and ``memory_tries``."""
    from accel.core.memory import asked_bytes, gigabytes, machine_bytes

    asked, total = asked_bytes(error), machine_bytes()
    cuda = "cuda" in str(error).lower()
    said = [f"an allocation of {gigabytes(asked)} failed"] if asked else []
    if not cuda and getattr(peak, "rss", None):
        said.append(
            f"at a peak of {gigabytes(peak.rss)} resident"
            + (f" of this machine's {gigabytes(total)}" if total else "")
        )
    return (
        f"out of {'the GPU' + chr(39) + 's ' if cuda else ''}memory in the {stage.name} stage"
        + (f" ({', '.join(said)})" if said else "")
        + "; "
        + memory_tries(config, target)
    )


def _run_and_commit(
    planned: PlannedStage,
    parent: Artifact,
    target: Target,
    store: Store,
    completed: list[str],
    progress: Callable[[str], None],
    resume: bool,
) -> Artifact:
    stage, config = planned.plan.stage, planned.plan.config
    work = store.work_dir(planned.key)
    with store.write(
        planned.key,
        kind=stage.produces,
        stage=stage.name,
        stage_version=stage.version,
        config=config.model_dump(mode="json"),
        parent=parent.key,
        target=(
            {"name": target.name, "fingerprint": target.fingerprint}
            if stage.target_specific
            else None
        ),
    ) as pending:
        ctx = _context(
            planned,
            parent,
            target,
            store,
            pending.dir,
            pending.metrics,
            pending.info,
            progress,
            resume,
        )
        t0 = time.perf_counter()
        note_stage(stage.name, memory_tries(config, target))
        peak = PeakMemory()
        try:
            with peak:
                stage.run(ctx)
        except StageError as e:
            e.completed = list(completed)
            raise
        except AccelError as e:
            raise StageError(stage.name, str(e), completed) from None
        except (MemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            message = memory_message(stage, config, target, e, peak)
            raise StageError(stage.name, message, completed) from None
        pending.metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
        pending.metrics.update(peak.metrics())
        if parent.stage == "source" and not store.has(parent.key):
            store.add_source(parent.path)  # a source is kept once something is built from it
    assert pending.artifact is not None
    shutil.rmtree(work, ignore_errors=True)
    return pending.artifact


def run_or_reuse(
    stage: Stage,
    config: StageConfig,
    parent: Artifact,
    target: Target,
    store: Store,
    progress: Callable[[str], None] = say,
    resume: bool = False,
) -> Artifact:
    """One stage on ``parent`` outside a recipe: its stored artifact (hashes verified) when the
    key is in the store, else a run."""
    config = config.for_target(target)
    key = stage_key(stage, config, parent.key, target)
    procs = Processes()
    if procs.is_main:
        store.clean_tmp()
    hit = store.has(key)
    procs.barrier()  # every process decides before process 0 writes
    if not procs.is_main:
        progress = _quiet
    if hit:
        progress(f"{stage.name}: cache hit ({key})")
        artifact = store.get(key)
        artifact.verify()
        return artifact
    planned = PlannedStage(StagePlan(0, stage, config), key, False)
    return run_stage(planned, parent, target, store, [], progress, resume)


def run_recipe(
    recipe: Recipe, store: Store, progress: Callable[[str], None] = say, resume: bool = False
) -> list[Artifact]:
    """Run every stage not in the store; returns the artifacts of all stages, in order.
    ``resume`` lets training stages continue from the checkpoints of an interrupted run."""
    procs = Processes()
    if procs.is_main:
        store.clean_tmp()
    else:
        progress = _quiet
    source, stages = plan(recipe, store)
    procs.barrier()  # every process plans before process 0 writes
    artifacts: list[Artifact] = []
    completed: list[str] = []
    for i, planned in enumerate(stages, 1):
        at = parent_position(recipe, i - 1)
        parent = source if at is None else artifacts[at]
        name = planned.plan.stage.name
        head = f"[{i}/{len(stages)}] {name}"
        if planned.hit:
            progress(f"{head}: cache hit ({planned.key})")
            artifact = store.get(planned.key)
            artifact.verify()
        else:
            progress(f"{head}: running")
            t0 = time.perf_counter()
            artifact = run_stage(planned, parent, recipe.target, store, completed, progress, resume)
            progress(f"{head}: done in {time.perf_counter() - t0:.1f}s ({planned.key})")
        completed.append(name)
        artifacts.append(artifact)
    return artifacts


def _quiet(message: str) -> None:
    pass


def default_store(path: str | Path | None = None) -> Store:
    return Store(Path(path or os.environ.get("ACCEL_STORE") or ".accel-store"))
