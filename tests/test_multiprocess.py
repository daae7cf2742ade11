"""Multi-process training under torchrun (what `accelerate launch --multi_gpu` runs), on CPU with
gloo: gradients are averaged over processes that draw different batches, checkpoints hold every
process's random stream, and only process 0 writes the store."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from accel.core.errors import StageError
from distill.trainer import Trainer, TrainingConfig, checkpoints, process_seed

from tiny import write_tiny_pipeline

pytestmark = pytest.mark.slow  # torchrun launches of two processes each

LR, SEED, BATCH = 0.1, 3, 8
W_TRUE = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

TOY = textwrap.dedent(
    f"""
    import json, sys, torch
    from torch import nn
    from distill.trainer import Trainer, TrainingConfig

    work, out = sys.argv[1], sys.argv[2]
    trainer = Trainer("toy", TrainingConfig(seed={SEED}, checkpoint_every=2), 2, __import__(
        "pathlib").Path(work), progress=lambda m: None)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr={LR})
    model, opt = trainer.prepare(model, opt)
    w_true = torch.tensor({W_TRUE.tolist()})

    def step():
        x = trainer.randn(({BATCH}, 4))
        loss = (model(x) - x @ w_true.T).pow(2).mean()
        trainer.backward(loss)
        opt.step()
        opt.zero_grad()
        return {{"loss": loss}}

    log = trainer.run(step)
    m = trainer.accelerator.unwrap_model(model)
    rank = trainer.accelerator.process_index
    with open(f"{{out}}.{{rank}}.json", "w") as f:
        json.dump({{"weight": m.weight.tolist(), "bias": m.bias.tolist(), "log": log}}, f)
    """
)


def torchrun(*args, cwd=None, timeout=300):
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*cmd, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_two_processes_average_gradients_of_their_own_batches(tmp_path):
    (tmp_path / "toy.py").write_text(TOY)
    r = torchrun(str(tmp_path / "toy.py"), str(tmp_path / "work"), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads((tmp_path / f"out.{rank}.json").read_text()) for rank in (0, 1)]
    assert runs[0]["weight"] == runs[1]["weight"] and runs[0]["bias"] == runs[1]["bias"]

    # replay: each process drew from process_seed(SEED, rank); DDP averages their gradients
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    gens = [torch.Generator().manual_seed(process_seed(SEED, rank)) for rank in (0, 1)]
    assert process_seed(SEED, 0) == SEED and process_seed(SEED, 1) != SEED
    losses = []
    for _ in range(2):
        grads, step_losses = [], []
        for g in gens:
            x = torch.randn((BATCH, 4), generator=g)
            loss = (model(x) - x @ W_TRUE.T).pow(2).mean()
            grads.append(torch.autograd.grad(loss, list(model.parameters())))
            step_losses.append(float(loss.detach()))
        with torch.no_grad():
            for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
                p -= LR * (g0 + g1) / 2
        losses.append(sum(step_losses) / 2)
    assert torch.allclose(torch.tensor(runs[0]["weight"]), model.weight, atol=1e-6)
    assert torch.allclose(torch.tensor(runs[0]["bias"]), model.bias, atol=1e-6)
    # the log holds the mean loss over processes, the same on both
    assert runs[0]["log"] == runs[1]["log"]
    assert [r["loss"] for r in runs[0]["log"]] == pytest.approx(losses, rel=1e-6)

    # the checkpoint keeps both processes' streams, and refuses a one-process resume
    (ckpt,) = checkpoints(tmp_path / "work")
    assert {p.name for p in ckpt.glob("generator_*")} == {
        "generator_0.safetensors",
        "generator_1.safetensors",
    }
    assert json.loads((ckpt / "loop.json").read_text())["num_processes"] == 2
    trainer = Trainer("toy", TrainingConfig(), 4, tmp_path / "work", resume=True)
    with pytest.raises(StageError, match="written by 2 process.*this run has 1"):
        trainer.run(lambda: {"loss": torch.tensor(0.0)})


def test_a_recipe_under_two_processes_writes_each_artifact_once(tmp_path):
    """consistency (every process trains) -> onnx (process 0 exports, process 1 waits)."""
    write_tiny_pipeline(tmp_path / "teacher")
    (tmp_path / "recipe.toml").write_text(
        textwrap.dedent(
            f"""
            name = "mp"
            source = "{tmp_path / "teacher"}"
            target = "cpu"
            [[stages]]
            stage = "consistency"
            solver_steps = 10
            iterations = 6
            batch_size = 4
            checkpoint_every = 3
            [[stages]]
            stage = "onnx"
            parity_batch_sizes = [1]
            """
        )
    )
    store = tmp_path / "store"
    r = torchrun("-m", "accel.cli", "run", str(tmp_path / "recipe.toml"), "--store", str(store))
    assert r.returncode == 0, r.stderr[-3000:]
    manifests = [json.loads((d / "manifest.json").read_text()) for d in store.glob("artifacts/*")]
    assert sorted(m["stage"] for m in manifests) == ["consistency", "onnx", "source"]
    (student,) = (m for m in manifests if m["stage"] == "consistency")
    log = json.loads((store / "artifacts" / student["key"] / "loss_log.json").read_text())
    assert len(log) == 6
    assert not any((store / "tmp").iterdir())
    assert not (store / "work").exists() or not any((store / "work").iterdir())
    assert r.stderr.count("[2/2] onnx: running") == 1  # progress from process 0 only

    # a stage that fails stops every process with the same one-line error, and writes nothing
    student_dir = tmp_path / "student"
    shutil.copytree(store / "artifacts" / student["key"], student_dir)
    (student_dir / "manifest.json").unlink()  # a copied-out student: its teacher is unknown
    r = torchrun("-m", "accel.cli", "distill", "adversarial", str(student_dir),
                 "--iterations", "2", "--store", str(tmp_path / "s2"))  # fmt: skip
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: stage 'adversarial'")]
    assert (
        len(errors) == 2 and errors[0] == errors[1] and "teacher is not in the store" in errors[0]
    )
    assert not list((tmp_path / "s2").glob("artifacts/*"))
