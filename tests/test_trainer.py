"""The shared trainer: checkpoints are complete, and a run that dies and resumes ends with the same
weights, EMA and loss log as one that never stopped."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from accel.core.errors import StageError
from distill.trainer import Trainer, TrainingConfig, checkpoints

from tiny import write_tiny_pipeline


class Crash(Exception):
    pass


def toy_run(work, resume=False, crash_at=None, iterations=12):
    config = TrainingConfig(checkpoint_every=5, seed=3)
    trainer = Trainer("toy", config, iterations, work, resume, progress=lambda m: None)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    ema = nn.Linear(4, 1)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, opt = trainer.prepare(model, opt)
    trainer.ema(ema, model, 0.9)
    w_true = torch.tensor([[1.0, -2.0, 0.5, 3.0]])

    def step():
        if crash_at is not None and trainer.step == crash_at:
            raise Crash
        x = trainer.randn((16, 4))
        loss = (model(x) - x @ w_true.T).pow(2).mean()
        trainer.backward(loss)
        opt.step()
        opt.zero_grad()
        return {"loss": loss}

    log = trainer.run(step)
    return model.state_dict(), ema.state_dict(), log


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    ref = toy_run(tmp_path / "ref")
    with pytest.raises(Crash):
        toy_run(tmp_path / "w", crash_at=8)
    assert [p.name for p in checkpoints(tmp_path / "w")] == ["checkpoint-5"]
    resumed = toy_run(tmp_path / "w", resume=True)
    for a, b in zip(ref[:2], resumed[:2], strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert resumed[2] == ref[2] and len(ref[2]) == 12
    assert [p.name for p in checkpoints(tmp_path / "w")] == ["checkpoint-10"]


def test_without_resume_a_stale_checkpoint_is_discarded(tmp_path):
    with pytest.raises(Crash):
        toy_run(tmp_path / "w", crash_at=8)
    fresh = toy_run(tmp_path / "w")  # starts over at step 0: same as a clean run
    ref = toy_run(tmp_path / "ref")
    assert fresh[2] == ref[2]


def test_a_nan_loss_is_a_stage_error(tmp_path):
    trainer = Trainer("toy", TrainingConfig(), 3, None, progress=lambda m: None)
    with pytest.raises(StageError, match="loss became nan at step 1"):
        trainer.run(lambda: {"loss": torch.tensor(float("nan"))})


def test_a_late_nan_names_its_step_and_losses_are_read_back_once_per_block(monkeypatch):
    """The loop keeps losses on the device and reads them back every LOG_EVERY steps (one GPU
    sync per block, not one per step); the log still has every step and a NaN its own step."""
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    trainer = Trainer("toy", TrainingConfig(), 40, None, progress=lambda m: None)
    log = trainer.run(lambda: {"loss": torch.tensor(float(trainer.step)), "b": 2.0})
    assert [r["loss"] for r in log] == list(range(40)) and all(r["b"] == 2.0 for r in log)
    assert reads == [(16, 2), (16, 2), (8, 2)]  # steps 1-16, 17-32, 33-40
    trainer = Trainer("toy", TrainingConfig(), 40, None, progress=lambda m: None)
    with pytest.raises(StageError, match="loss became inf at step 21"):
        trainer.run(lambda: {"loss": torch.tensor(float("inf") if trainer.step == 20 else 1.0)})


def test_fp16_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(StageError, match="'fp16' needs a CUDA GPU"):
        Trainer("toy", TrainingConfig(mixed_precision="fp16"), 3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mixed_precision": "target"}, "'target' is resolved by a recipe's target"),
        ({"fsdp": True, "gradient_accumulation_steps": 2}, "fsdp takes gradient_accumulation"),
    ],
)
def test_training_options_that_cannot_run_are_refused(options, message):
    with pytest.raises(StageError, match=message):
        Trainer("toy", TrainingConfig(**options), 3)


def test_mixed_precision_target_is_the_targets_and_keys_the_artifact():
    from accel.core.target import load_target
    from accel.recipe import stage_key
    from accel.registry import get_stage
    from distill.configs import training_precision

    cpu, h200, t4 = load_target("cpu"), load_target("h200"), load_target("h200")
    t4 = t4.model_copy(update={"compute_capability": "7.5", "gpu": "T4"})
    assert [training_precision(t) for t in (cpu, h200, t4)] == ["no", "bf16", "fp16"]
    stage = get_stage("consistency")
    config = stage.config(mixed_precision="target")
    assert config.for_target(h200).mixed_precision == "bf16"
    assert stage.config(mixed_precision="no").for_target(h200).mixed_precision == "no"
    # the key is the resolved config's: two bf16 GPUs share a student, a CPU target does not
    keys = {t.name: stage_key(stage, config.for_target(t), "p", t) for t in (cpu, h200)}
    assert keys["h200"] == stage_key(stage, stage.config(mixed_precision="bf16"), "p", cpu)
    assert keys["cpu"] == stage_key(stage, stage.config(mixed_precision="no"), "p", cpu)


def test_fsdp_units_are_the_blocks_of_every_block_list():
    from distill.trainer import shard_units

    import families

    flux = families.build_pipeline("flux", 0).transformer
    units = shard_units(flux)
    assert units == [*flux.transformer_blocks, *flux.single_transformer_blocks]
    unet = families.build_pipeline("sd15", 0).unet
    mid = unet.mid_block  # not in a list: its own lists' blocks are the units
    blocks = [*unet.down_blocks, *unet.up_blocks, *mid.attentions, *mid.resnets]
    assert {id(u) for u in shard_units(unet)} == {id(b) for b in blocks}


def test_gradient_checkpointing_trains_to_the_same_weights(tmp_path):
    """Recomputing each block's activations in the backward pass changes no number."""
    from distill.trainer import enable_gradient_checkpointing

    import families

    def train(checkpointing):
        torch.manual_seed(0)
        model = families.build_pipeline("sd3", 0).transformer
        config = TrainingConfig(seed=1, gradient_checkpointing=checkpointing)
        trainer = Trainer("toy", config, 2, progress=lambda m: None)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        model, opt = trainer.prepare(model, opt)
        assert model.gradient_checkpointing == checkpointing

        def step():
            x = trainer.randn((2, 16, 16, 16))
            out = model(x, timestep=torch.tensor([100.0, 700.0]),
                        encoder_hidden_states=trainer.randn((2, 7, 96)),
                        pooled_projections=trainer.randn((2, 64))).sample  # fmt: skip
            loss = (out - x).pow(2).mean()
            trainer.backward(loss)
            opt.step()
            opt.zero_grad()
            return {"loss": loss}

        trainer.run(step)
        return model.state_dict()

    plain, recomputed = train(False), train(True)
    assert all(torch.equal(plain[k], recomputed[k]) for k in plain)
    assert not enable_gradient_checkpointing(nn.Linear(2, 2))


@pytest.mark.parametrize("lora", [False, True], ids=["full weights", "lora"])
def test_a_recomputed_block_sees_the_state_its_forward_pass_saw(tmp_path, lora):
    """accel switches per call what a block computes beyond its inputs: the active LoRA adapter
    (teacher = adapters off, student, EMA target on one base) and SD3's attention processors
    (``RepeatedTokenAttention`` over a text context with a repeated padding tail). The backward
    pass recomputes each checkpointed block under the state of its forward pass, not under
    whatever is set when ``backward`` runs: the gradients are those without checkpointing."""
    from distill.checkpoint import load_denoiser
    from distill.lora import STUDENT, LoraShape, active, lora_base
    from distill.trainer import enable_gradient_checkpointing

    import families

    root = families.write_pipeline("sd3", tmp_path / "sd3")

    def grads(checkpointing):
        torch.manual_seed(0)  # peft's initialisation of A
        den, _ = load_denoiser(root)
        adapter = den.adapter
        h, w = families.RESOLUTION["sd3"]
        cond = adapter.encode(["a red circle"], height=h, width=w)
        x = torch.randn(1, *adapter.latent_shape(h, w), generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500])
        if lora:
            net, _ = lora_base(den, LoraShape(4, 4.0, adapter.lora_targets), (STUDENT, "ema"),
                               torch.float32)  # fmt: skip
            base = net.base
            with torch.no_grad():  # B != 0: the student differs from the teacher
                for name, p in base.named_parameters():
                    if f"lora_B.{STUDENT}" in name:
                        p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        else:
            net = base = den.backbone
            net.requires_grad_(True)
        if checkpointing:
            assert enable_gradient_checkpointing(net)
        loss = adapter.forward(net, x, t, cond).square().mean()
        with torch.no_grad():
            adapter.forward(den.backbone, x, t, cond)  # the teacher's call in between
        with active(base, None) if lora else torch.enable_grad():
            loss.backward()  # under the teacher's state (LoRA: adapters off)
        return {n: p.grad.clone() for n, p in base.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys() and plain
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_killed_distillation_resumes_to_the_same_student(tmp_path):
    """SIGKILL an `accel distill consistency` run after its first checkpoint; `--resume` finishes
    it with the same student as an uninterrupted run."""
    write_tiny_pipeline(tmp_path / "teacher")
    args = [
        "distill", "consistency", str(tmp_path / "teacher"),
        "--solver-steps", "10", "--iterations", "150", "--batch-size", "4",
        "--checkpoint-every", "10",
    ]  # fmt: skip
    env = dict(os.environ, TQDM_DISABLE="1")

    def accel(store, *extra, **kw):
        cmd = [sys.executable, "-m", "accel.cli", *args, "--store", str(store), *extra]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)

    killed = accel(tmp_path / "s")
    work = tmp_path / "s" / "work"
    deadline = time.monotonic() + 120
    while not list(work.glob("*/checkpoint-*")) and killed.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read().decode()
    assert not list((tmp_path / "s" / "artifacts").glob("*")), "finished before the kill"

    resumed = accel(tmp_path / "s", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()
    assert "resuming from checkpoint-" in err.decode()
    clean = accel(tmp_path / "clean")
    out2, err2 = clean.communicate(timeout=300)
    assert clean.returncode == 0, err2.decode()

    weights = "unet/diffusion_pytorch_model.safetensors"
    a = load_file(os.path.join(out.decode().strip(), weights))
    b = load_file(os.path.join(out2.decode().strip(), weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "s" / "work").exists() or not any((tmp_path / "s" / "work").iterdir())


def test_progressive_resumes_inside_its_second_round(tmp_path, monkeypatch):
    """A crash in round 2 of 4 -> 2 -> 1 keeps round 1's student and round 2's checkpoint; the
    resumed stage ends with the uninterrupted run's student."""
    import distill.progressive as progressive
    from accel.pipeline import default_store, run_recipe
    from accel.recipe import load_recipe

    write_tiny_pipeline(tmp_path / "teacher")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        'name = "p"\nsource = "teacher"\ntarget = "cpu"\n[[stages]]\nstage = "progressive"\n'
        "teacher_steps = 4\nstudent_steps = 1\niterations_per_round = 6\nbatch_size = 2\n"
        "checkpoint_every = 2\n"
    )
    quiet = lambda m: None  # noqa: E731
    (clean,) = run_recipe(load_recipe(recipe), default_store(tmp_path / "clean"), quiet)

    real, calls = progressive.progressive_target, []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 6 + 3:  # round 2, step 3: after its checkpoint at step 2
            raise Crash
        return real(*args)

    monkeypatch.setattr(progressive, "progressive_target", crashing)
    with pytest.raises(Crash):
        run_recipe(load_recipe(recipe), default_store(tmp_path / "s"), quiet)
    monkeypatch.setattr(progressive, "progressive_target", real)
    said = []
    (resumed,) = run_recipe(load_recipe(recipe), default_store(tmp_path / "s"), said.append, True)
    assert any("resuming from checkpoint-2" in m for m in said)
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(clean.path / weights), load_file(resumed.path / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_is_refused_by_the_jvp_methods_at_config_time():
    from pydantic import ValidationError

    from distill.meanflow import MeanFlowConfig
    from distill.scm import SCMConfig

    with pytest.raises(ValidationError, match="forward-mode JVP"):
        SCMConfig(compile=True)
    with pytest.raises(ValidationError, match='use objective = "split"'):
        MeanFlowConfig(compile=True, objective="jvp")
    assert MeanFlowConfig(compile=True).objective == "split"


@pytest.mark.slow
def test_compiled_training_follows_eager_training(tmp_path):
    """``compile = true``: the student and the frozen teacher run compiled (in place, so the
    weights and their names stay the module's) and train to what eager training reaches, up to
    inductor's rounding."""
    from distill.checkpoint import load_denoiser
    from distill.consistency import ConsistencyConfig, distill
    from distill.data import load_dataset

    path = write_tiny_pipeline(tmp_path / "teacher")
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        teacher, _ = load_denoiser(path)
        data = load_dataset("digits", teacher)
        config = ConsistencyConfig(
            iterations=6, batch_size=8, checkpoint_every=0, compile=compiled, solver_steps=10
        )
        student, log = distill(teacher, data, config, progress=lambda m: None)
        assert (teacher.backbone._compiled_call_impl is not None) == compiled
        runs[compiled] = (student.backbone.state_dict(), [r["loss"] for r in log])
    (eager, eager_log), (comp, comp_log) = runs[False], runs[True]
    assert eager.keys() == comp.keys()
    np.testing.assert_allclose(comp_log, eager_log, rtol=1e-3)
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-3, atol=1e-5)
