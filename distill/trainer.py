"""The training loop every distillation method shares, on Hugging Face Accelerate.

Accelerate gives device placement, gradient accumulation, mixed precision on GPU and multi-process
runs under ``accelerate launch``; this module adds what a distillation stage needs around it:

- one seeded ``torch.Generator`` that draws every batch index, timestep and noise of the method, so a
  run is a function of its config;
- EMA copies (target networks, EMA students) updated after each optimizer step;
- a checkpoint every ``checkpoint_every`` steps: ``Accelerator.save_state`` (models, optimizers,
  LR schedulers, RNG states) plus the EMA weights (safetensors), the generator state and the loss log,
  written to a temporary directory and renamed, so a directory named ``checkpoint-N`` is complete;
- ``resume``: continue from the newest checkpoint and end with the same weights as an uninterrupted
  run (every random draw after step N comes from the restored generator);
- a tqdm bar with the running loss and rate, and a loss log (one dict per step) for the artifact;
  the losses stay on the device and are read back every ``LOG_EVERY`` steps, so a GPU run does not
  stop for the host after every step (a NaN is still reported with its own step).

Under ``accelerate launch`` (or ``torchrun``) every process runs the same stage on its own batches:
process r draws from a generator seeded with (seed, r) (process 0 with ``seed`` itself, so a
one-process run is unchanged), models are wrapped in DDP so gradients are averaged, the effective
batch is ``batch_size`` x processes, and the logged losses are means over processes. Checkpoints
hold every process's generator state and resume only with the same number of processes.

Models too big for one device (a 12B Flux student; DMD2 holds three such networks) train with
``fsdp = true``: every trained model, and its EMA copy, is fully sharded over the processes with
PyTorch's FSDP2 (``fully_shard``, the implementation Accelerate's ``fsdp_version = 2`` plugin calls):
each block of the model's block lists (transformer blocks, UNet down/up blocks) is its own unit,
then the root, so a process holds 1/N of the parameters, gradients and Adam state and all-gathers
one block at a time (ZeRO-3). With ``mixed_precision = "bf16"`` the blocks compute in bf16 over fp32
master weights and reduce gradients in fp32 (``MixedPrecisionPolicy``); ``"target"`` takes bf16 on
a CUDA target that has it (compute capability 8.0 and up), fp16 below that, and fp32 on a CPU target.
``gradient_checkpointing = true`` recomputes each block's activations in the backward pass
(diffusers' ``enable_gradient_checkpointing``), with or without FSDP. Accelerate still launches the
processes and reduces the losses; it does not shard here because Accelerate 1.16 turns its FSDP
plugin on only for accelerator devices (``state.py``: a ``MULTI_CPU`` run never becomes ``FSDP``),
so the trainer calls ``fully_shard`` itself and the path tested on CPU with gloo is the path that runs
on GPUs. Sharded checkpoints are gathered to full safetensors (models, EMA copies, optimizer state)
and resume bit-exactly with the same number of processes. A one-process run has nothing to shard.

A method builds its modules and optimizers, calls ``prepare``, registers EMA pairs, then ``run``s a
step function that computes its losses, calls ``backward`` and steps its (prepared) optimizers;
``unwrap`` gives a trained model back as a plain module.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from accel.core.errors import StageError
from accel.core.stage import say
from distill.configs import TrainingConfig

CHECKPOINT_PREFIX = "checkpoint-"
LOG_EVERY = 16  # optimizer steps between host reads of the losses (each read syncs a GPU)
ON_READ_BACK: list[Callable[[int], None]] = []  # called with the step after each read-back


def process_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``: ``seed`` itself on process 0 (and in a one-process run), one
    derived from (seed, rank) on the others, so data-parallel processes draw different batches."""
    if rank == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def seeded_generator(seed: int) -> torch.Generator:
    """A generator seeded for this process (``process_seed``)."""
    rank = int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    return torch.Generator().manual_seed(process_seed(seed, rank))


def checkpoints(work: Path) -> list[Path]:
    """Complete checkpoints in ``work``, oldest first."""
    if not work.is_dir():
        return []
    found = [
        p
        for p in work.iterdir()
        if p.is_dir()
        and p.name.startswith(CHECKPOINT_PREFIX)
        and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


class Trainer:
    """One training run of ``iterations`` optimizer steps, checkpointed into ``work``.

    ``stage`` names the stage in errors; ``resume`` continues from the newest checkpoint in ``work``
    (without it, old checkpoints there are discarded and the run starts from step 0). Every random
    draw comes from ``generator`` (default: a new one seeded with ``config.seed``)."""

    def __init__(
        self,
        stage: str,
        config: TrainingConfig,
        iterations: int,
        work: Path | None = None,
        resume: bool = False,
        desc: str | None = None,
        progress: Callable[[str], None] = say,
        generator: torch.Generator | None = None,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.stage, self.iterations, self.work = stage, iterations, work
        self.resume, self.desc, self.progress = resume, desc or stage, progress
        self.checkpoint_every = config.checkpoint_every if work is not None else 0
        if config.mixed_precision == "target":
            raise StageError(
                stage, "mixed_precision = 'target' is resolved by a recipe's target; run the "
                "stage from a recipe or name 'no', 'bf16' or 'fp16'",
            )  # fmt: skip
        if config.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise StageError(stage, "mixed_precision = 'fp16' needs a CUDA GPU; use 'no' or 'bf16'")
        if config.fsdp and config.mixed_precision == "fp16":
            raise StageError(stage, "fsdp trains in 'bf16' or 'no' mixed precision, not 'fp16'")
        if config.fsdp and config.gradient_accumulation_steps > 1:
            raise StageError(
                stage, "fsdp takes gradient_accumulation_steps = 1 here; raise batch_size or "
                "the number of processes instead",
            )  # fmt: skip
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
        self.precision = config.mixed_precision
        self.checkpointing = config.gradient_checkpointing
        self.compiling = config.compile
        self.sharded = config.fsdp and self.accelerator.num_processes > 1
        self._shards: dict[int, nn.Module] = {}  # id(sharded model) -> its unsharded twin (meta)
        self._sharded_models: list[nn.Module] = []  # in prepare order: checkpoint names
        self._sharded_optimizers: list[tuple[torch.optim.Optimizer, nn.Module]] = []
        set_seed(config.seed)
        # a caller's generator continues its stream (the rounds of one progressive stage)
        self.generator = generator or seeded_generator(config.seed)
        self.step = 0
        self.log: list[dict[str, float]] = []
        self._models: list[nn.Module] = []
        self._ema: list[tuple[nn.Module, nn.Module, float]] = []

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _compile(self, module: nn.Module, frozen: bool = False) -> None:
        if self.compiling:
            cuda = self.accelerator.device.type == "cuda"
            module.compile(mode="reduce-overhead" if frozen and cuda else None)

    def place_teacher(self, teacher, frozen: bool = True):
        """The teacher (a ``Denoiser``) on the training device and, with ``compile``, its backbone
        compiled; ``frozen``: called without gradients only (CUDA graphs on CUDA), False where
        gradients flow through it to the student (ADD's discriminator features)."""
        teacher.to(self.device)
        self._compile(teacher.backbone, frozen)
        return teacher

    def prepare(self, *objects):
        """Accelerate's prepare for models, optimizers and LR schedulers (same order back); under
        ``fsdp`` the models are sharded instead and the optimizers step their shards."""
        models = [o for o in objects if isinstance(o, nn.Module)]
        if self.checkpointing:
            for m in models:
                enable_gradient_checkpointing(m)
        for m in models:
            self._compile(m)
        if not self.sharded:
            out = self.accelerator.prepare(*objects)
            out = out if isinstance(out, tuple) else (out,)
            self._models += [m for m in out if isinstance(m, nn.Module)]
            return out if len(out) > 1 else out[0]
        owner = {id(p): (i, n) for i, m in enumerate(models) for n, p in m.named_parameters()}
        for m in models:
            self._shard(m)
        self._models += models
        self._sharded_models += models
        for opt in (o for o in objects if isinstance(o, torch.optim.Optimizer)):
            if opt.state:
                raise ValueError("prepare optimizers before their first step")
            used: set[int] = set()
            for group in opt.param_groups:  # fully_shard made new (sharded) parameters
                where = [owner[id(p)] for p in group["params"]]
                used |= {i for i, _ in where}
                group["params"] = [models[i].get_parameter(n) for i, n in where]
            container = (
                models[min(used)]
                if len(used) == 1
                else nn.ModuleList(models[i] for i in sorted(used))
            )
            self._sharded_optimizers.append((opt, container))
        others = [
            o for o in objects if not isinstance(o, nn.Module | torch.optim.Optimizer)
        ]  # LR schedulers: Accelerate's, as without fsdp
        done = self.accelerator.prepare(*others) if others else ()
        prepared = iter(done if isinstance(done, tuple) else (done,))
        out = tuple(
            o if isinstance(o, nn.Module | torch.optim.Optimizer) else next(prepared)
            for o in objects
        )
        return out if len(out) > 1 else out[0]

    def _shard(self, model: nn.Module) -> None:
        """FSDP2 full sharding of ``model`` in place: each block of its block lists, then the
        root; an unsharded twin on the meta device is kept for ``unwrap``."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        meta = {
            id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in model.parameters()
        }
        self._shards[id(model)] = copy.deepcopy(model, meta)  # no weights copied
        mesh = init_device_mesh(self.device.type, (self.accelerator.num_processes,))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16"
            else MixedPrecisionPolicy()
        )
        model.to(self.device)
        for block in shard_units(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """A trained model as a plain module: Accelerate's unwrap, or under ``fsdp`` the
        model's unsharded twin holding the gathered weights (on every process)."""
        twin = self._shards.get(id(model))
        if twin is None:
            return self.accelerator.unwrap_model(model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        reshard(model)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        twin.load_state_dict(full, assign=True)
        return twin.to(self.device)

    def ema(self, target: nn.Module, source: nn.Module, decay: float) -> nn.Module:
        """Keep ``target`` an exponential moving average of ``source``: after every optimizer
        step, target <- decay * target + (1 - decay) * source (shard by shard under fsdp)."""
        target.to(self.device).requires_grad_(False)
        if self.sharded:
            self._shard(target)
        self._ema.append((target, self.accelerator.unwrap_model(source), decay))
        return target

    def randn(
        self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=dtype).to(self.device)

    def randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.generator).to(self.device)

    def rand(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.rand(n, generator=self.generator, dtype=dtype).to(self.device)

    @contextlib.contextmanager
    def gathered(self, model: nn.Module | None):
        """Under fsdp, ``model``'s blocks stay gathered from their first forward in the block
        until the block is resharded on leaving: for a backward pass that enters a block
        other than through its output (a feature tap inside it), which FSDP's pre-backward
        hook, registered on block outputs, does not see. Otherwise nothing."""
        if model is None or id(model) not in self._shards:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
        for u in units:
            u.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for u in units:
                u.set_reshard_after_forward(True, recurse=False)
            reshard(model)

    def same_on_every_process(self, value: int) -> int:
        """Process 0's ``value`` under fsdp, where a draw that decides how many forward passes a
        step makes (DMD2's backward-simulation depth) must agree: each forward of a sharded model
        is a collective. Without fsdp, each process keeps its own draw."""
        if not self.sharded:
            return value
        from accelerate.utils import broadcast_object_list

        return int(broadcast_object_list([value], from_process=0)[0])

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    # ------------------------------------------------------------------ the loop

    def run(self, step_fn: Callable[[], dict[str, torch.Tensor | float]]) -> list[dict[str, float]]:
        """Call ``step_fn`` (under gradient accumulation) until ``iterations`` optimizer steps are
        done; returns the loss log. ``step_fn`` returns its losses by name (detached or not)."""
        from tqdm import tqdm

        self._start()
        acc = self.accelerator
        with tqdm(
            total=self.iterations,
            initial=self.step,
            desc=self.desc,
            leave=False,
            dynamic_ncols=True,
            disable=None if acc.is_main_process else True,
        ) as bar:
            pending: list[torch.Tensor] = []  # losses of steps not yet read back to the host
            names: list[str] = []

            def flush() -> None:
                if not pending:
                    return
                rows = torch.stack(pending).tolist()  # the one host sync per LOG_EVERY steps
                for hook in ON_READ_BACK:  # the device has finished every step so far
                    hook(self.step)
                first = self.step - len(pending) + 1
                pending.clear()
                for i, row in enumerate(rows):
                    bad = [
                        k
                        for k, v in zip(names, row, strict=True)
                        if v != v or abs(v) == float("inf")
                    ]
                    if bad:
                        raise StageError(
                            self.stage,
                            f"the {bad[0]} loss became {row[names.index(bad[0])]} at step "
                            f"{first + i}; lower learning_rate",
                        )
                    self.log.append(dict(zip(names, row, strict=True)))
                recent = self.log[-50:]
                bar.set_postfix(
                    {k: f"{sum(r[k] for r in recent) / len(recent):.4f}" for k in names},
                    refresh=False,
                )

            while self.step < self.iterations:
                with acc.accumulate(*self._models):
                    losses = step_fn()
                if not acc.sync_gradients:
                    continue
                names = list(losses)
                pending.append(self._mean_over_processes(losses))
                self._update_ema()
                self.step += 1
                bar.update(1)
                checkpoint = self.checkpoint_every and self.step % self.checkpoint_every == 0
                if len(pending) >= LOG_EVERY or checkpoint or self.step == self.iterations:
                    flush()
                if checkpoint:
                    self.save()
        return self.log

    def _mean_over_processes(self, losses: dict) -> torch.Tensor:
        """The losses as one float64 vector on the accelerator's device, averaged over processes
        (every process then sees the same NaN); read back to the host only every LOG_EVERY steps,
        so a GPU step does not wait for the host (no .item() per step)."""
        acc = self.accelerator
        values = torch.stack(
            [
                torch.as_tensor(v, dtype=torch.float64, device=acc.device).detach()
                if not isinstance(v, torch.Tensor)
                else v.detach().to(acc.device, torch.float64)
                for v in losses.values()
            ]
        )
        if acc.num_processes > 1:
            values = acc.reduce(values, reduction="mean")
        return values

    @torch.no_grad()
    def _update_ema(self) -> None:
        for target, source, decay in self._ema:
            if self.sharded:  # a no-grad forward leaves the root unsharded until resharded
                reshard(target)
                reshard(source)
            for pt, ps in zip(target.parameters(), source.parameters(), strict=True):
                pt.lerp_(ps.detach().to(pt.dtype), 1 - decay)

    # ------------------------------------------------------------------ checkpoints

    def _start(self) -> None:
        if self.work is None:
            return
        acc = self.accelerator
        found = checkpoints(self.work)
        if found and self.resume:
            self.load(found[-1])
            self.progress(f"{self.stage}: resuming from {found[-1].name}")
        elif found and acc.is_main_process:
            self.progress(
                f"{self.stage}: discarding {found[-1].name} of an interrupted run "
                "(pass --resume to continue from it)"
            )
            for p in found:
                shutil.rmtree(p)
        acc.wait_for_everyone()

    def save(self) -> Path:
        """Write checkpoint-<step> atomically; older checkpoints are removed once it exists."""
        from safetensors.torch import save_file

        assert self.work is not None
        acc = self.accelerator
        final = self.work / f"{CHECKPOINT_PREFIX}{self.step}"
        tmp = self.work / f".{final.name}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            self.work.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        save_file(
            {"state": self.generator.get_state()},
            str(tmp / f"generator_{acc.process_index}.safetensors"),
        )
        # every process takes part in gathering sharded weights; process 0 writes them
        full = {f"ema_{i}": self._full_state(t) for i, (t, _, _) in enumerate(self._ema)}
        full |= {f"fsdp_model_{i}": self._full_state(m) for i, m in enumerate(self._sharded_models)}
        optimizers = [self._optimizer_state(o, c) for o, c in self._sharded_optimizers]
        acc.wait_for_everyone()
        if acc.is_main_process:
            for name, state in full.items():
                save_file(state, str(tmp / f"{name}.safetensors"))
            for i, (tensors, meta) in enumerate(optimizers):
                save_file(tensors, str(tmp / f"fsdp_optimizer_{i}.safetensors"), metadata=meta)
            loop = {"step": self.step, "log": self.log, "num_processes": acc.num_processes}
            (tmp / "loop.json").write_text(json.dumps(loop))
            os.replace(tmp, final)
            for old in checkpoints(self.work)[:-1]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        acc = self.accelerator
        loop = json.loads((path / "loop.json").read_text())
        if loop.get("num_processes", 1) != acc.num_processes:
            raise StageError(
                self.stage,
                f"{path.name} was written by {loop.get('num_processes', 1)} process(es) and this "
                f"run has {acc.num_processes}; resume with the same number of processes, or drop "
                "--resume to start over",
            )
        # Accelerate's optimizer and RNG files are torch pickles; they are read only from this
        # stage's own work dir in the store, never from a user-supplied path.
        acc.load_state(str(path))
        for i, (target, _, _) in enumerate(self._ema):
            self._load_full_state(target, load_file(str(path / f"ema_{i}.safetensors")))
        for i, m in enumerate(self._sharded_models):
            self._load_full_state(m, load_file(str(path / f"fsdp_model_{i}.safetensors")))
        for i, (opt, container) in enumerate(self._sharded_optimizers):
            self._load_optimizer_state(opt, container, path / f"fsdp_optimizer_{i}.safetensors")
        state = load_file(str(path / f"generator_{acc.process_index}.safetensors"))["state"]
        self.generator.set_state(state)
        self.step, self.log = int(loop["step"]), list(loop["log"])

    # ------------------------------------------------------------------ sharded state

    def _full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s whole state dict on the CPU (gathered from its shards under fsdp)."""
        if id(module) not in self._shards:
            return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        reshard(module)
        return {k: v.contiguous() for k, v in get_model_state_dict(module, options=options).items()}

    def _load_full_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if id(module) not in self._shards:
            module.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))

    def _optimizer_state(self, opt, container) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A sharded optimizer's whole state as safetensors: tensors keyed "<param>::<name>",
        everything else (numbers, param groups) as JSON metadata."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(container, opt, options=options)
        tensors, scalars = {}, {}
        for param, entries in state.get("state", {}).items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{param}::{name}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{param}::{name}"] = value
        groups = state.get("param_groups", [])
        return tensors, {"scalars": json.dumps(scalars), "param_groups": json.dumps(groups)}

    def _load_optimizer_state(self, opt, container, path: Path) -> None:
        from safetensors import safe_open
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        state: dict[str, dict] = {}
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                param, name = key.rsplit("::", 1)
                state.setdefault(param, {})[name] = f.get_tensor(key)
        for key, value in json.loads(meta["scalars"]).items():
            param, name = key.rsplit("::", 1)
            state.setdefault(param, {})[name] = value
        full = {"state": state, "param_groups": json.loads(meta["param_groups"])}
        set_optimizer_state_dict(
            container, opt, full, options=StateDictOptions(full_state_dict=True)
        )


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one: the elements of every outermost ``nn.ModuleList``
    (diffusers' ``transformer_blocks``, ``single_transformer_blocks``, ``down_blocks``,
    ``up_blocks``) that hold parameters."""
    units: list[nn.Module] = []

    def walk(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                units.extend(b for b in child if any(True for _ in b.parameters()))
            else:
                walk(child)

    walk(model)
    return units


def reshard(model: nn.Module) -> None:
    """Free every FSDP unit's gathered parameters in ``model``: its parameters are its shards."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def enable_gradient_checkpointing(model: nn.Module) -> bool:
    """diffusers' gradient checkpointing on every model in ``model`` that supports it (the
    backbone inside a method's wrapper), through ``checkpoint_block``; False when none does."""
    found = False
    for m in model.modules():
        if getattr(m, "_supports_gradient_checkpointing", False) and not getattr(
            m, "gradient_checkpointing", False
        ):
            m.enable_gradient_checkpointing(checkpoint_block)
            found = True
    return found or any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def checkpoint_block(block: nn.Module, *args):
    """diffusers' ``gradient_checkpointing_func``: torch's non-reentrant checkpoint, with the
    block's per-call state at its forward pass set again while the backward pass recomputes it.
    accel switches two things per call that a block's output depends on: the active LoRA adapter
    (one base is teacher, student and EMA target, ``distill.lora``) and the attention processors
    (SD3's ``RepeatedTokenAttention`` over a shortened context). A plain checkpoint recomputes
    under whatever is set at ``backward``, other activations than the forward's; torch refuses
    that ("a different number of tensors was saved"), or where the counts agree, the gradients
    are silently wrong."""
    from torch.utils.checkpoint import checkpoint

    state = _block_state(block)

    def run(*inputs):
        now = _block_state(block)
        _set_block_state(state)
        try:
            return block(*inputs)
        finally:
            _set_block_state(now)

    return checkpoint(run, *args, use_reentrant=False)


def _block_state(block: nn.Module) -> tuple[list, list]:
    from distill.lora import lora_layers

    processors = [(m, m.processor) for m in block.modules() if hasattr(m, "set_processor")]
    adapters = [(m, m.disable_adapters, list(m.active_adapters)) for m in lora_layers(block)]
    return processors, adapters


def _set_block_state(state: tuple[list, list]) -> None:
    processors, adapters = state
    for m, processor in processors:
        if m.processor is not processor:
            m.set_processor(processor)
    for layer, off, names in adapters:  # as distill.lora switches them: trainability kept
        flags = [(p, p.requires_grad) for p in layer.parameters()]
        layer.set_adapter(names)
        layer.enable_adapters(not off)
        for p, flag in flags:
            p.requires_grad_(flag)


def write_loss_log(out: Path, log: list[dict[str, float]] | dict) -> None:
    """The loss log of a training stage, as ``loss_log.json`` in its artifact."""
    Path(out, "loss_log.json").write_text(json.dumps(log) + "\n")


def mean_tail(log: list[dict[str, float]], key: str = "loss", n: int = 50) -> float:
    tail = log[-n:]
    return sum(r[key] for r in tail) / len(tail)
