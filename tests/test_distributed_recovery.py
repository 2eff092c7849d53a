"""Data-parallel LoRA recovery on torch.distributed (gloo, CPU): 2 ranks train what 1 process trains.

tests/distributed_recovery_worker.py runs every case of its ``CASES`` in one plain process (no process group), in
a group of 1 rank and in a group of 2 ranks, launched as ``torchrun`` launches them, each rank with the same data.
A group of 1 rank gives the plain process's weights bit for bit. 2 ranks (each a contiguous half of every batch,
DDP averaging the LoRA gradients) give the same masks, losses and perplexities to 1e-6 relative, logits within
1e-12 in float64 and 5e-6 in float32, and every rank the same weights bit for bit; on LLaMA, Qwen2 and OPT, with
uneven shares (batch_size 5) and with gradient checkpointing. A batch too small to split, or other data on one
rank, ends every rank with an error that says so.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_recovery_worker import CASES

WORKER = Path(__file__).with_name("distributed_recovery_worker.py")
TIMEOUT = 60  # seconds a collective waits (HF_PRUNING_DIST_TIMEOUT): a hang fails fast
REFUSED_AT_TWO = ("llama_one_row", "other_data")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path) -> list[dict]:
    """Run the worker on ``world`` ranks (0: one plain process, no process group); each rank's results."""
    out.mkdir(parents=True, exist_ok=True)
    port, procs = _free_port(), []
    for rank in range(max(world, 1)):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update({"OMP_NUM_THREADS": "1", "HF_PRUNING_DIST_TIMEOUT": str(TIMEOUT)})
        if world:
            env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(logs)[-4000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(len(procs))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(plain process, 1-rank group, [rank 0, rank 1] of a 2-rank group), each case -> result."""
    plain = launch(0, tmp_path_factory.mktemp("plain"))[0]
    one = launch(1, tmp_path_factory.mktemp("one"))[0]
    two = launch(2, tmp_path_factory.mktemp("two"))
    return plain, one, two


def _no_error(*results) -> None:
    errors = [r.get("error") for r in results]
    assert errors == [None] * len(results), errors


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_rank_group_is_the_plain_run(runs, case):
    plain, one, _ = runs
    _no_error(plain[case], one[case])
    assert one[case]["digest"] == plain[case]["digest"]  # bit for bit
    assert one[case]["report"]["losses"] == plain[case]["report"]["losses"]
    assert one[case]["report"]["ranks"] == 1 and "ranks" not in plain[case]["report"]


@pytest.mark.parametrize("case", sorted(set(CASES) - set(REFUSED_AT_TWO)))
def test_two_ranks_train_as_one(runs, case):
    _, one, (rank0, rank1) = runs
    ref, got, other = one[case], rank0[case], rank1[case]
    _no_error(ref, got, other)
    assert got["digest"] == other["digest"]  # every rank ends with the same weights, bit for bit
    assert got["report"] == other["report"]  # the same losses and perplexities on every rank
    assert got["report"]["ranks"] == 2
    # the losses (~4.5) are float32 means over a batch's tokens (float32 even for a float64 model): one float32
    # step there is 4.8e-7 and the split batch adds its halves in another order, so they agree to a few steps
    # (1e-6 relative), not to 1e-6 absolute
    assert got["report"]["losses"] == pytest.approx(ref["report"]["losses"], rel=1e-6, abs=0)
    for key in ("ppl_before", "ppl_after"):
        assert got["report"][key] == pytest.approx(ref["report"][key], rel=1e-6)
    assert got["report"]["loss_last"] < got["report"]["loss_first"]
    for key in ("targets", "masked_targets", "trainable_params", "trained_tokens", "settings"):
        assert got["report"][key] == ref["report"][key], key
    assert got["record"] == ref["record"]
    differ = [name for name in ref["masks"] if not torch.equal(got["masks"][name], ref["masks"][name])]
    assert not differ, differ
    assert sum(int(m.sum()) for m in got["masks"].values()) > 0  # pruned weights stayed zero
    # float64: the same weights to float64 rounding (the split, the weighting of uneven shares and DDP's average
    # are exact); float32: within what Adam's steps make of float32 rounding (see the worker's CASES)
    atol = 1e-12 if case.endswith("_float64") else 5e-6
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=atol)
    assert got["lora_left"] == [] and other["lora_left"] == []


def test_checkpointing_starts_as_without(runs):
    """Gradient checkpointing under DDP (compared with one process above): the first step's loss is the untrained
    model's, as without checkpointing."""
    _, one, (rank0, _) = runs
    assert rank0["llama_checkpointing_float64"]["report"]["losses"][0] == pytest.approx(
        one["llama_float64"]["report"]["losses"][0], rel=1e-6)


def test_refusals_stop_every_rank(runs):
    plain, one, (rank0, rank1) = runs
    for case in REFUSED_AT_TWO:
        _no_error(plain[case], one[case])  # one process is fine
    for result in (rank0, rank1):
        error = result["llama_one_row"]["error"]
        assert error.startswith("ConfigError: recovery batches of 1 row(s)") and "batch_size >= 2" in error, error
        error = result["other_data"]["error"]
        assert error.startswith("DistributedError: ranks [1] hold a different model, settings or recovery data"), error
        assert "same model, settings, data and eval_ids" in error
