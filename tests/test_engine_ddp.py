"""Distributed training: helpers in one process, and 2-process torchrun runs on CPU (gloo).

The equivalence checked: 2 processes x batch 1 take the same optimiser steps as 1 process x
batch 1 x 2 accumulated micro-batches (and 2 processes x 2 micro-batches, the first under
``no_sync``, as 1 process x 4). Both see the same samples per step (process ``r`` takes every 2nd
sample of the same permutation, the accumulating process takes them in turn), every BatchNorm
normalises one sample in both (plain per-process BN, as BEVFusion; SyncBatchNorm has no CPU
implementation), and DDP's mean of the gradients equals the sum of the accumulated
``loss / micro-batches`` gradients. A "1 process x batch 2" reference would differ through BN's
batch statistics, so it would not allow a tight comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from engine_helpers import read_metrics, small_config, torch_threads

from bridgeta.engine.distributed import (
    DistributedContext,
    all_gather_bytes,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    cleanup,
    init_distributed,
    wrap_model,
)
from bridgeta.engine.trainer import train


@pytest.fixture(scope="module")
def dataroot(engine_world):
    return engine_world


# Same samples, no randomness in the data: what the DDP / accumulation comparisons need.
DETERMINISTIC = [
    "train.batch_size=1", "train.deterministic=true", "train.seed=3",
    "train.optimizer.lr=0.003", "train.optimizer.warmup_steps=1",
    "data.augment.image=false", "data.augment.bev=false",
]


def run_two_processes(tmp_path, name: str, body: str) -> None:
    """Run ``body`` (Python, with the test helpers importable) in 2 CPU processes under torchrun."""
    script = tmp_path / f"{name}.py"
    header = f"""
        import sys
        import torch
        torch.set_num_threads(1)
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        """
    script.write_text(textwrap.dedent(header) + textwrap.dedent(body))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_single_process_context_and_helpers(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.owns_group) == (0, 1, True, False, False)
    assert ctx.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    module = torch.nn.Linear(2, 2)
    assert wrap_model(module, ctx) is module
    counts = torch.tensor([3.0, 4.0])
    assert all_reduce_sum(counts, ctx) is counts and counts.tolist() == [3.0, 4.0]
    assert all_reduce_mean(counts, ctx).tolist() == [3.0, 4.0]
    assert all_gather_bytes(b"abc", ctx) == [b"abc"]
    barrier(ctx)
    cleanup(ctx)
    # WORLD_SIZE=1 (torchrun --nproc_per_node 1) is a single process too.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not init_distributed().distributed
    assert DistributedContext(rank=1, world_size=2).is_main is False


def test_cleanup_waits_for_every_rank_after_a_finished_run_but_not_after_a_failure(monkeypatch):
    import bridgeta.engine.distributed as distributed

    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    owner = DistributedContext(rank=1, world_size=2, owns_group=True)
    cleanup(owner)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    # A failed rank leaves at once: its peers may sit in another collective, and a barrier there
    # would hold this rank until the group's timeout instead of letting torchrun stop them.
    cleanup(owner, finished=False)
    assert calls == ["destroy"]
    calls.clear()
    cleanup(DistributedContext(rank=1, world_size=2, owns_group=False))  # a caller's group is left alone
    assert calls == []


def test_two_processes_equal_one_process_with_accumulation(dataroot, tmp_path):
    common = ["train.epochs=2", "train.checkpoint_every=0", *DETERMINISTIC]
    ddp_out = tmp_path / "ddp"
    run_two_processes(
        tmp_path,
        "train_ddp",
        f"""
        from engine_helpers import small_config
        from bridgeta.engine.distributed import cleanup, init_distributed
        from bridgeta.engine.trainer import train
        # One process group for both runs: train() reuses a group it did not create.
        ctx = init_distributed()
        assert ctx.world_size == 2 and ctx.owns_group
        for accumulation, out in (1, {str(ddp_out)!r}), (2, {str(ddp_out) + "-acc"!r}):
            overrides = [*{common!r}, f"train.grad_accumulation={{accumulation}}"]
            train(small_config({str(dataroot)!r}, *overrides), out)
        cleanup(ctx)
        """,
    )

    with torch_threads(1):
        single = train(small_config(dataroot, *common, "train.grad_accumulation=2"), tmp_path / "single")
        train(small_config(dataroot, *common, "train.grad_accumulation=4"), tmp_path / "single-acc")
    assert single["steps"] == 4  # 4 samples / (1 x 2) per step x 2 epochs

    from bridgeta.models.bev_model import build_model

    parameters = sorted(name for name, _ in build_model(small_config(dataroot)).named_parameters())
    # (DDP run, 1-process run, tolerance): 2 x batch 1 vs accumulation 2 sums the same two
    # gradients in the same order (the runs agree to the bit on CPU; the tolerance only covers
    # float32 rounding); 2 x (batch 1 x 2 micro-batches, under no_sync) vs accumulation 4 adds
    # four gradients in another order (((g0 + g2) + (g1 + g3)) vs (((g0 + g1) + g2) + g3)).
    # The -acc pair sums its gradients in another order, and AdamW divides each by its own running
    # scale: where a gradient is near 0, rounding can flip its first update's sign, a difference
    # of up to two steps (lr 3e-3), on a few elements (1 % seen on an AVX2 machine, none on an
    # AVX-512 one). So there the share of weights apart beyond rounding is what is checked: nearly
    # every weight must agree to 1e-5, where another sample or a skipped micro-batch moves most
    # weights by a good part of a step. The bound on the largest difference is only a sanity check.
    lr, updates = 3e-3, 2
    pairs = [("ddp", "single", 1e-5), ("ddp-acc", "single-acc", 1e-4)]
    for ddp_name, single_name, logged_rtol in pairs:
        ddp_rows, single_rows = read_metrics(tmp_path / ddp_name), read_metrics(tmp_path / single_name)
        assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows]  # rank 0 alone writes
        # Same samples per step: losses (reduced over processes) and gradient norms agree.
        for key in ("loss", "grad_norm"):
            assert [r[key] for r in ddp_rows] == pytest.approx([r[key] for r in single_rows], rel=logged_rtol), key
        ddp = load_file(str(tmp_path / ddp_name / "model.safetensors"))
        reference = load_file(str(tmp_path / single_name / "model.safetensors"))
        assert ddp.keys() == reference.keys()
        if ddp_name == "ddp":
            for name in parameters:
                torch.testing.assert_close(ddp[name], reference[name], rtol=1e-6, atol=1e-7,
                                           msg=lambda m: f"{ddp_name} vs {single_name}, {name}: {m}")
        else:
            differences = torch.cat([(ddp[name] - reference[name]).abs().flatten() for name in parameters])
            assert (differences > 1e-5).float().mean() < 0.05, f"{ddp_name}: weights apart beyond rounding"
            assert differences.max() <= 2 * lr * updates, f"{ddp_name}: a weight further apart than its updates allow"
        # BatchNorm running statistics are rank 0's (its samples alone) under DDP, the single
        # process's cover every sample: those buffers differ by design, parameters only compared.
        assert any(not torch.equal(ddp[name], reference[name]) for name in ddp if "running_mean" in name)

    # Checkpoints of a 2-process run hold both processes' RNG states (seeded seed + rank).
    checkpoint = tmp_path / "ddp" / "checkpoints" / "step-00000004"
    assert len(json.loads((checkpoint / "state.json").read_text())["rng"]) == 2
    rng = load_file(str(checkpoint / "rng.safetensors"))
    assert set(rng) == {"rank0.torch_cpu", "rank1.torch_cpu"}
    assert not torch.equal(rng["rank0.torch_cpu"], rng["rank1.torch_cpu"])


def test_two_process_distillation_equals_one_process_with_accumulation(dataroot, tmp_path):
    """BridgeTA under DDP: the distiller (student + assistant, frozen teacher) is the DDP module;
    eps* is per micro-batch in both runs, so 2 x batch 1 matches accumulation 2."""
    from engine_helpers import distill_config, write_teacher

    teacher = write_teacher(tmp_path / "teacher.safetensors", dataroot)
    # The default CrossKD probe reads the TA head's running BatchNorm statistics, which each
    # micro-batch updates: accumulation sees the first micro-batch's update in the second, a
    # second process does not (running statistics differ by design, as below). The batch-
    # statistics probe keeps the two runs comparable term by term.
    common = ["train.epochs=1", "distill.ta_probe_mode=train", *DETERMINISTIC]
    run_two_processes(
        tmp_path,
        "distill_ddp",
        f"""
        from engine_helpers import distill_config
        from bridgeta.engine.trainer import train
        train(distill_config({str(dataroot)!r}, {str(teacher)!r}, *{common!r}), {str(tmp_path / "ddp")!r})
        """,
    )
    with torch_threads(1):
        train(distill_config(dataroot, teacher, *common, "train.grad_accumulation=2"), tmp_path / "single")

    ddp_rows, single_rows = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    assert len(ddp_rows) == len(single_rows) == 2  # 4 samples / 2 per step
    for key in ("loss", "kd/fld", "kd/dld", "kd/lld", "grad_norm"):
        assert [r[key] for r in ddp_rows] == pytest.approx([r[key] for r in single_rows], rel=1e-5), key
    ddp = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    reference = load_file(str(tmp_path / "single" / "model.safetensors"))
    assert ddp.keys() == reference.keys() and not any(k.startswith("teacher.") for k in ddp)
    trained = [k for k in ddp if k.startswith(("student.", "assistant.")) and "running_" not in k and "num_batches" not in k]
    assert any(k.startswith("assistant.") for k in trained)
    for name in trained:
        torch.testing.assert_close(ddp[name], reference[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
