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
- a tqdm bar with the running loss and rate, and a loss log (one dict per step) for the artifact.

Under ``accelerate launch`` (or ``torchrun``) every process runs the same stage on its own batches:
process r draws from a generator seeded with (seed, r) (process 0 with ``seed`` itself, so a
one-process run is unchanged), models are wrapped in DDP so gradients are averaged, the effective
batch is ``batch_size`` x processes, and the logged losses are means over processes. Checkpoints
hold every process's generator state and resume only with the same number of processes.

A method builds its modules and optimizers, calls ``prepare``, registers EMA pairs, then ``run``s a
step function that computes its losses, calls ``backward`` and steps its (prepared) optimizers.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from accel.core.errors import StageError
from accel.core.stage import StageConfig, say

CHECKPOINT_PREFIX = "checkpoint-"


class TrainingConfig(StageConfig):
    """Fields every training stage takes (the recipe keys and `accel distill` options)."""

    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    seed: int = 0
    checkpoint_every: int = Field(500, ge=0)
    """Optimizer steps between resumable checkpoints in the stage's work dir (0: none)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Autocast precision (Accelerate); fp16 needs a GPU."""


def process_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``: ``seed`` itself on process 0 (and in a one-process run), one
    derived from (seed, rank) on the others, so data-parallel processes draw different batches."""
    if rank == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def seeded_generator(seed: int) -> torch.Generator:
    """A generator seeded for this process (``process_seed``)."""
    from accel.core.processes import Processes

    return torch.Generator().manual_seed(process_seed(seed, Processes().rank))


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
        if config.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise StageError(stage, "mixed_precision = 'fp16' needs a CUDA GPU; use 'no' or 'bf16'")
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
        )
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

    def prepare(self, *objects):
        """Accelerate's prepare for models, optimizers and LR schedulers (same order back)."""
        out = self.accelerator.prepare(*objects)
        out = out if isinstance(out, tuple) else (out,)
        self._models += [m for m in out if isinstance(m, nn.Module)]
        return out if len(out) > 1 else out[0]

    def ema(self, target: nn.Module, source: nn.Module, decay: float) -> nn.Module:
        """Keep ``target`` an exponential moving average of ``source``: after every optimizer
        step, target <- decay * target + (1 - decay) * source."""
        target.to(self.device).requires_grad_(False)
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
            while self.step < self.iterations:
                with acc.accumulate(*self._models):
                    losses = self._mean_over_processes(step_fn())
                bad = [k for k, v in losses.items() if v != v or abs(v) == float("inf")]
                if bad:
                    raise StageError(
                        self.stage,
                        f"the {bad[0]} loss became {losses[bad[0]]} at step {self.step + 1}; "
                        "lower learning_rate",
                    )
                if not acc.sync_gradients:
                    continue
                self._update_ema()
                self.step += 1
                self.log.append(losses)
                bar.update(1)
                recent = self.log[-50:]
                bar.set_postfix(
                    {k: f"{sum(r[k] for r in recent) / len(recent):.4f}" for k in losses},
                    refresh=False,
                )
                if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                    self.save()
        return self.log

    def _mean_over_processes(self, losses: dict) -> dict[str, float]:
        """Losses as floats, averaged over processes (every process then sees the same NaN)."""
        acc = self.accelerator
        values = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64).detach() for v in losses.values()]
        )
        if acc.num_processes > 1:
            values = acc.reduce(values.to(acc.device), reduction="mean").cpu()
        return dict(zip(losses, values.tolist(), strict=True))

    @torch.no_grad()
    def _update_ema(self) -> None:
        for target, source, decay in self._ema:
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
        acc.wait_for_everyone()
        if acc.is_main_process:
            for i, (target, _, _) in enumerate(self._ema):
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in target.state_dict().items()},
                    str(tmp / f"ema_{i}.safetensors"),
                )
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
            target.load_state_dict(load_file(str(path / f"ema_{i}.safetensors")))
        state = load_file(str(path / f"generator_{acc.process_index}.safetensors"))["state"]
        self.generator.set_state(state)
        self.step, self.log = int(loop["step"]), list(loop["log"])


def write_loss_log(out: Path, log: list[dict[str, float]] | dict) -> None:
    """The loss log of a training stage, as ``loss_log.json`` in its artifact."""
    Path(out, "loss_log.json").write_text(json.dumps(log) + "\n")


def mean_tail(log: list[dict[str, float]], key: str = "loss", n: int = 50) -> float:
    tail = log[-n:]
    return sum(r[key] for r in tail) / len(tail)
