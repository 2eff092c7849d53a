"""Data-parallel calibration on torch.distributed (gloo, CPU): 2 ranks give what 1 rank gives.

Each scenario runs tests/distributed_worker.py in 1 and in 2 processes, launched as ``torchrun`` launches them
(``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), each rank with the same full calibration. For every
method on a tiny model of every architecture: the same plan, recorded config, report and masks, logits within
1e-6, and every rank holding the same weights bit for bit. Bad input on one rank and a rank killed mid-run end
every rank with an error that says so, well before the collective timeout.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import CASES, OFFLOADED
from tiny_models import ARCHS

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT = 30  # seconds a collective waits (HF_PRUNING_DIST_TIMEOUT): a hang fails fast


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, world: int, out: Path, *args: str) -> tuple[list[dict | None], list[int], str]:
    """Run ``scenario`` (with ``args``) on ``world`` ranks; returns each rank's results (None if it wrote none), the exit codes
    and the ranks' stderr."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "HF_PRUNING_DIST_TIMEOUT": str(TIMEOUT)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario, str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    results = []
    for rank in range(world):
        path = out / f"rank{rank}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else None)
    return results, [p.returncode for p in procs], "\n".join(logs)


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    one, codes1, log1 = launch("grid", 1, tmp_path_factory.mktemp("one"))
    two, codes2, log2 = launch("grid", 2, tmp_path_factory.mktemp("two"))
    assert codes1 == [0] and codes2 == [0, 0], log1[-3000:] + log2[-3000:]
    return one[0], two


#: report entries that describe one rank's work (time, passes it ran), not the result
PER_RANK = ("seconds", "_s", "_forwards", "_backwards", "backward_passes")
#: cases a model refuses by design (the same error from every rank count)
REFUSED = {("shortgpt_compensated", "opt_postln"), ("gradmap", "opt_postln")}


def same_report(got, ref, path: str = "report") -> None:
    """The reports agree: the same keys and strings, numbers to 1e-6 relative (sums over ranks round
    differently), the per-rank work entries left out."""
    if isinstance(ref, dict):
        keys = {k for k in ref if not str(k).endswith(PER_RANK)}
        assert {k for k in got if not str(k).endswith(PER_RANK)} == keys, path
        for k in keys:
            same_report(got[k], ref[k], f"{path}[{k!r}]")
    elif isinstance(ref, (list, tuple)):
        assert len(got) == len(ref), path
        for k, (a, b) in enumerate(zip(got, ref)):
            same_report(a, b, f"{path}[{k}]")
    elif isinstance(ref, float):
        assert got == pytest.approx(ref, rel=1e-6, abs=1e-9), path
    elif isinstance(ref, torch.Tensor):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9, msg=path)
    else:
        assert got == ref, path


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", sorted([*CASES, *OFFLOADED]))
def test_two_ranks_prune_as_one(grids, case, arch):
    one, (rank0, rank1) = grids
    ref, got, other = one[(case, arch)], rank0[(case, arch)], rank1[(case, arch)]
    if (case, arch) in REFUSED:
        assert "error" in ref and got == ref and other == ref
        return
    assert "error" not in ref, ref.get("error")  # every other case runs on every architecture
    assert got.get("error") is None and other.get("error") is None, (got.get("error"), other.get("error"))
    assert got["digest"] == other["digest"]  # every rank ends with the same weights, bit for bit
    assert got["plan"] == ref["plan"]
    assert got["record"] == ref["record"]
    same_report(got["report"], ref["report"])
    differ = [name for name in ref["masks"] if not torch.equal(got["masks"][name], ref["masks"][name])]
    assert not differ, differ
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=1e-6)


def test_bad_input_on_one_rank_stops_every_rank(tmp_path):
    (r0, r1), codes, log = launch("bad_config", 2, tmp_path)
    assert codes == [0, 0], log[-3000:]
    assert "sparsity" in r1["error"] and "DistributedError" not in r1["error"]  # its own error
    assert r0["error"].startswith("DistributedError: rank 1 failed during checking"), r0["error"]
    assert "sparsity" in r0["error"]


def test_ranks_with_different_calibration_are_refused(tmp_path):
    (r0, r1), codes, log = launch("other_calibration", 2, tmp_path)
    assert codes == [0, 0], log[-3000:]
    for result in (r0, r1):
        assert result["error"].startswith("DistributedError: ranks [1] hold a different model, config or "
                                          "calibration"), result["error"]


def test_a_killed_rank_ends_the_others_with_an_error(tmp_path):
    (r0, r1), codes, log = launch("killed", 2, tmp_path)
    assert r1 is None and codes[1] == 3
    assert codes[0] == 0, log[-3000:]
    assert r0["error"].startswith("DistributedError: rank 0 of 2:"), r0["error"]
    assert "another rank stopped answering" in r0["error"]
    assert r0["seconds"] < TIMEOUT  # the lost peer is noticed, not waited for


def _torchrun(nproc: int, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_PRUNING_DIST_TIMEOUT": str(TIMEOUT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "hf_pruning.cli",
                           *argv], env=env, capture_output=True, text=True, timeout=600)


def test_hf_prune_under_torchrun_saves_once_what_one_rank_saves(tmp_path):
    """``torchrun --nproc_per_node 2 -m hf_pruning.cli prune ...``: one progress bar, one "saved" line, one save
    (rank 0), and the saved model is the one a 1-process launch saves."""
    from tiny_models import tiny_model, tiny_tokenizer, tokens

    import hf_pruning

    hf_pruning.save_pretrained(tiny_model("qwen2"), tmp_path / "dense", tokenizer=tiny_tokenizer())
    common = ["--method", "sparsegpt", "--blocksize", "32", "--n-samples", "8", "--seq-len", "16"]
    runs = {n: _torchrun(n, "prune", str(tmp_path / "dense"), str(tmp_path / f"out{n}"), *common) for n in (1, 2)}
    for n, run in runs.items():
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        assert run.stdout.count("saved PrunedQwen2ForCausalLM") + run.stdout.count("saved Qwen2ForCausalLM") == 1, n
        assert run.stderr.count("sparsegpt:   0%") == 1, run.stderr[-3000:]  # one bar: rank 0's
        assert not list((tmp_path / f"out{n}").glob(".hf_pruning-save-*"))
    ids = tokens(2, 12)
    one, two = (hf_pruning.from_pretrained(tmp_path / f"out{n}") for n in (1, 2))
    with torch.no_grad():
        torch.testing.assert_close(two(ids).logits, one(ids).logits, rtol=0, atol=1e-6)
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        assert torch.equal(a == 0, b == 0), name
