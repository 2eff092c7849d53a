"""One rank of a data-parallel test run (started by tests/test_distributed.py the way ``torchrun`` starts ranks:
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment, gloo on the CPU).

``python tests/distributed_worker.py SCENARIO OUT`` runs a scenario and writes this rank's results to
``OUT/rank<r>.pt``:

- ``grid``: every method of :data:`CASES` on a tiny model of every architecture, each with the same full
  calibration on every rank; per case the plan, the recorded config, the report, the pruned weights' digest, the
  masks and the logits on a probe (or the error it raised).
- ``bad_config``: rank 1 passes an impossible sparsity; ``other_calibration``: rank 1 passes other ids;
  ``killed``: rank 1 dies in the middle of a run (``os._exit``). Each records the error every rank ends with.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import torch
from tiny_models import ARCHS, tiny_model, tokens

import hf_pruning
from hf_pruning.engine import distributed
from hf_pruning.methods.sparsegpt import shared_factor

CALIB = tokens(batch=16, length=16, seed=3)  # 4 batches of LAYER_BATCH rows: 2 per rank at 2 ranks
COMPENSATION = tokens(batch=8, length=16, seed=4)
PROBE = tokens(batch=2, length=12, seed=9)
CASES = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "wanda_2:4": {"method": "wanda", "pattern": "2:4"},
    "wanda_two_pass": {"method": "wanda", "one_pass": False},
    "sparsegpt": {"method": "sparsegpt", "blocksize": 32},
    "sparsegpt_2:4": {"method": "sparsegpt", "blocksize": 32, "pattern": "2:4"},
    "llm_barber": {"method": "llm_barber", "init": "wanda", "threshold": 0.5},
    "llm_barber_sparsegpt": {"method": "llm_barber", "init": "sparsegpt", "blocksize": 32, "threshold": 0.3,
                             "reconstruct": True},
    "shortgpt": {"method": "shortgpt", "num_removals": 2},
    "shortgpt_compensated": {"method": "shortgpt", "num_removals": 2, "compensate": True, "ridge": 0.1},
    "sleb": {"method": "sleb", "num_removals": 2},
    "finercut": {"method": "finercut", "num_removals": 3},
    "taylor": {"method": "taylor", "num_removals": 2},
    "gradmap": {"method": "gradmap", "num_removals": 2, "ridge": 0.1},
    "gradmap_iterative": {"method": "gradmap", "num_removals": 2, "mode": "iterative", "compensate": False},
    "flap": {"method": "flap", "ratio": 0.2},
    "heads": {"method": "heads", "score": "wanda", "unit": "group", "per_layer": 1},
    "harp": {"method": "harp", "num_layers": 2, "grid": [0.0, 0.5, 1.0]},
    "harp_flap": {"method": "harp", "num_layers": 2, "grid": [0.0, 0.5, 1.0], "flap_ratio": 0.1},
}


#: cases run on a model whose weights accelerate offloads (the layers on disk / in a CPU weights map) on every
#: rank, against the same method in memory with 1 rank: the device map works within each rank
OFFLOADED = {"sparsegpt_disk": ("sparsegpt", "disk"), "sleb_cpu": ("sleb", "cpu"), "flap_disk": ("flap", "disk")}


def _model(arch: str, mode: str):
    if mode == "memory":
        return tiny_model(arch)
    import tempfile

    from offload_models import _disk_map, offloaded_model
    from transformers import AutoModelForCausalLM

    own = tempfile.mkdtemp(prefix=f"offload-rank{distributed.world()[0]}-")  # each rank's own offload folder
    if mode == "cpu":
        return offloaded_model(arch, mode, own)
    model = tiny_model(arch)
    shared = os.path.join(OUT, f"{arch}-checkpoint")
    hf_pruning.save_pretrained(model, shared)  # rank 0 writes it, the others wait
    return AutoModelForCausalLM.from_pretrained(shared, device_map=_disk_map(model), dtype=torch.float32,
                                                offload_folder=os.path.join(own, "offload")).eval()


def _weights(model) -> dict:
    """name -> tensor for every parameter, offloaded ones read from accelerate's copies."""
    from hf_pruning.engine.streaming import read_tensor

    return {name: read_tensor(model, name) for name, _ in model.named_parameters()}


def _case(arch: str, config: dict, mode: str = "memory") -> dict:
    model = _model(arch, mode)
    try:
        hf_pruning.prune_(model, dict(config), calibration=CALIB)
    except Exception as err:  # the same error must come out of every rank count
        return {"error": f"{type(err).__name__}: {err}"}
    with torch.no_grad():
        logits = model(PROBE).logits.float()
    weights = _weights(model)
    digest = hashlib.sha256()
    for name, tensor in sorted(weights.items()):
        digest.update(name.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
    masks = {name: (p == 0) for name, p in weights.items() if p.dim() == 2}
    return {"plan": hf_pruning.get_plan(model).to_json(), "record": model.config.pruning_config,
            "report": model.hf_pruning_report, "digest": digest.hexdigest(), "masks": masks, "logits": logits}


def grid(only: str = "") -> dict:
    """Every case of :data:`CASES` (or those named in ``only``, comma-separated) on every architecture."""
    names = only.split(",") if only else [*CASES, *OFFLOADED]
    out = {}
    for name in names:
        method, mode = OFFLOADED.get(name, (name, "memory"))
        if mode != "memory" and distributed.world()[1] == 1:
            mode = "memory"  # the reference: 1 rank, in memory
        for arch in ARCHS:
            out[(name, arch)] = _case(arch, CASES[method], mode)
    return out


def _failure(run) -> dict:
    start = time.monotonic()
    try:
        run()
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def bad_config() -> dict:
    sparsity = 1.5 if distributed.world()[0] == 1 else 0.5
    return _failure(lambda: hf_pruning.prune_(tiny_model("llama"), {"method": "wanda", "sparsity": sparsity},
                                              calibration=CALIB))


def other_calibration() -> dict:
    ids = CALIB.flip(0) if distributed.world()[0] == 1 else CALIB
    return _failure(lambda: hf_pruning.prune_(tiny_model("llama"), {"method": "wanda"}, calibration=ids))


def killed() -> dict:
    rank = distributed.world()[0]
    real = torch.distributed.all_reduce
    calls = [0]

    def dying_all_reduce(*args, **kwargs):
        calls[0] += 1
        if rank == 1 and calls[0] == 3:
            os._exit(3)  # killed mid-run: no exception, no goodbye
        return real(*args, **kwargs)

    torch.distributed.all_reduce = dying_all_reduce
    return _failure(lambda: hf_pruning.prune_(tiny_model("llama"), {"method": "sparsegpt", "blocksize": 32},
                                              calibration=CALIB))


OUT = "."  # the run's output folder (main)


def main(scenario: str, out: str, *args: str) -> None:
    global OUT
    OUT = out
    torch.set_num_threads(1)
    shared_factor.BLOCK = 24  # the tiny models' SparseGPT factors span several block tasks on every rank
    assert distributed.init_from_env("gloo")
    result = {"grid": grid, "bad_config": bad_config, "other_calibration": other_calibration,
              "killed": killed}[scenario](*args)
    torch.save(result, os.path.join(out, f"rank{distributed.world()[0]}.pt"))
    if scenario != "killed":
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
