"""Fully sharded training (``fsdp = true``: FSDP2, full sharding, per-block units) on CPU with gloo,
a tiny Flux transformer: two processes give the weights one process gives on the same effective
batch (with gradient checkpointing on in the sharded run: recomputation changes nothing), each
process holds about half of the parameters, a resumed run equals an uninterrupted one bit for
bit (weights, EMA, loss log), bf16 computes the blocks in bf16 over fp32 master weights, and a
recipe's consistency stage trains a Flux student sharded and writes it once, and DMD2 (three
networks, a random number of generator passes per step: process 0's number) fine-tunes it."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_multiprocess import torchrun

pytestmark = pytest.mark.slow  # torchrun launches of two processes each

TOY = textwrap.dedent(
    """
    import copy, json, sys, torch
    from pathlib import Path
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file
    from distill.trainer import Trainer, TrainingConfig, process_seed

    work, out, iterations, resume, fsdp, ckpt, precision, virtual = sys.argv[1:9]
    config = TrainingConfig(
        seed=3, checkpoint_every=2, fsdp=fsdp == "1", gradient_checkpointing=ckpt == "1",
        mixed_precision=precision,
    )
    trainer = Trainer("toy", config, int(iterations), Path(work), resume=resume == "1",
                      progress=lambda m: None)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    )
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)  # Accelerate's, beside shards
    model, opt, sched = trainer.prepare(model, opt, sched)
    trainer.ema(ema, model, 0.5)
    # a one-process run draws every (virtual) process's batch: the same effective batch
    gens = [trainer.generator] + [
        torch.Generator().manual_seed(process_seed(3, r)) for r in range(1, int(virtual))
    ]
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                     indexing="ij"), -1).reshape(16, 3)
    dtypes = set()
    model.transformer_blocks[0].register_forward_hook(lambda m, i, o: dtypes.add(str(o[1].dtype)))

    def batch(g):
        return (torch.randn(2, 16, 8, generator=g), torch.randn(2, 5, 32, generator=g),
                torch.randn(2, 32, generator=g), torch.rand(2, generator=g))

    def step():
        x, ctx, pooled, t = (torch.cat(v) for v in zip(*[batch(g) for g in gens]))
        v = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx,
                  pooled_projections=pooled, txt_ids=torch.zeros(5, 3), img_ids=ids).sample
        loss = (v.float() - x.flip(-1)).pow(2).mean()
        trainer.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        return {"loss": loss.detach()}

    log = trainer.run(step)
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
    master = sorted({str(p.dtype) for p in model.parameters()})
    final, final_ema = trainer.unwrap(model), trainer.unwrap(ema)
    rank = trainer.accelerator.process_index
    save_file({**{k: v.contiguous() for k, v in final.state_dict().items()},
               **{"ema." + k: v.contiguous() for k, v in final_ema.state_dict().items()}},
              f"{out}.{rank}.safetensors")
    total = sum(p.numel() for p in final.parameters())
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"log": log, "local": local, "total": total, "dtypes": sorted(dtypes),
                   "master": master}, f)
    """
)


def _run(tmp_path, name, *, procs, iterations=4, resume=False, fsdp=True, ckpt=True,
         precision="no", virtual=1, work=None):  # fmt: skip
    script = tmp_path / "toy.py"
    script.write_text(TOY)
    args = [str(script), str(tmp_path / (work or name)), str(tmp_path / name), str(iterations),
            "1" if resume else "0", "1" if fsdp else "0", "1" if ckpt else "0", precision,
            str(virtual)]  # fmt: skip
    if procs == 1:
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                           timeout=300)  # fmt: skip
    else:
        r = torchrun(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = range(procs)
    weights = [load_file(str(tmp_path / f"{name}.{r}.safetensors")) for r in ranks]
    info = [json.loads((tmp_path / f"{name}.{r}.json").read_text()) for r in ranks]
    return weights, info


def test_two_sharded_processes_equal_one_process_and_resume_bit_exactly(tmp_path):
    (one,), (info1,) = _run(tmp_path, "one", procs=1, fsdp=False, ckpt=False, virtual=2)
    two, info2 = _run(tmp_path, "two", procs=2)
    # every process ends with the same full weights
    assert all(torch.equal(two[0][k], two[1][k]) for k in two[0])
    # sharded: each process held about half of the parameters (biases and norms are split too)
    assert all(i["local"] < 0.55 * i["total"] for i in info2)
    assert info2[0]["local"] + info2[1]["local"] == info2[0]["total"] == info1["total"]
    # the same effective batch: the same weights, up to the order of float additions
    # (measured 2.5e-6; process 0's half of the batch alone, i.e. gradients not averaged over
    # the processes, moves them by 8e-3)
    worst = max(float((one[k] - two[0][k]).abs().max()) for k in one)
    assert worst < 1e-5, worst
    for a, b in zip(info1["log"], info2[0]["log"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)

    # interrupted after the checkpoint at step 2, then resumed to step 4: bit for bit
    _run(tmp_path, "half", procs=2, iterations=2, work="resumed")
    resumed, info3 = _run(tmp_path, "resumed", procs=2, resume=True)
    assert (tmp_path / "resumed" / "checkpoint-4").is_dir()
    assert set(resumed[0]) == set(two[0])
    assert all(torch.equal(resumed[0][k], two[0][k]) for k in two[0])  # weights and EMA
    assert info3[0]["log"] == info2[0]["log"]


def test_bf16_shards_compute_in_bf16_over_fp32_master_weights(tmp_path):
    weights, info = _run(tmp_path, "bf16", procs=2, iterations=2, precision="bf16")
    assert info[0]["dtypes"] == ["torch.bfloat16"] and info[0]["master"] == ["torch.float32"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights[0].values())
    fp32, _ = _run(tmp_path, "fp32", procs=2, iterations=2)
    diff = max(float((weights[0][k] - fp32[0][k]).abs().max()) for k in fp32[0])
    assert 0 < diff < 1e-2  # bf16 rounding moved the weights, not the training


def test_a_recipe_trains_a_flux_student_sharded(tmp_path):
    import families

    families.write_pipeline("flux", tmp_path / "teacher")
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "recipe.toml").write_text(
        textwrap.dedent(
            f"""
            name = "fsdp"
            source = "{tmp_path / "teacher"}"
            target = "cpu"
            [[stages]]
            stage = "consistency"
            solver_steps = 4
            iterations = 4
            batch_size = 2
            checkpoint_every = 2
            fsdp = true
            gradient_checkpointing = true
            mixed_precision = "target"
            dataset = "prompts:{tmp_path / "prompts.txt"}"
            [[stages]]
            stage = "adversarial"
            student_steps = 2
            iterations = 2
            batch_size = 2
            fsdp = true
            dataset = "prompts:{tmp_path / "prompts.txt"}"
            """
        )
    )
    store = tmp_path / "store"
    r = torchrun("-m", "accel.cli", "run", str(tmp_path / "recipe.toml"), "--store", str(store))
    assert r.returncode == 0, r.stderr[-3000:]
    manifests = [json.loads((d / "manifest.json").read_text()) for d in store.glob("artifacts/*")]
    assert sorted(m["stage"] for m in manifests) == ["adversarial", "consistency", "source"]
    (student,) = (m for m in manifests if m["stage"] == "consistency")
    assert student["config"]["mixed_precision"] == "no"  # the cpu target: fp32
    out = store / "artifacts" / student["key"]
    assert len(json.loads((out / "loss_log.json").read_text())) == 4
    from diffusers import FluxTransformer2DModel

    teacher = FluxTransformer2DModel.from_pretrained(tmp_path / "teacher" / "transformer")
    trained = FluxTransformer2DModel.from_pretrained(out / "transformer")
    changed = [
        n for n, p in trained.named_parameters() if not torch.equal(p, teacher.get_parameter(n))
    ]
    assert changed and all(torch.isfinite(p).all() for p in trained.parameters())
