"""One rank of a data-parallel LoRA recovery test run (started by tests/test_distributed_recovery.py the way
``torchrun`` starts ranks: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment, gloo on
the CPU; without them, one plain process with no process group).

``python tests/distributed_recovery_worker.py OUT`` runs every case of :data:`CASES` and writes this rank's
results to ``OUT/rank<r>.pt``: per case the report (losses, perplexities), a digest of every weight, the masks
(zeros of the 2-d weights) and the logits on a probe, or the error the case raised. Each case prunes a tiny model
with Wanda 50% first (data parallel too under a group), then recovers it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys

import torch
from tiny_models import _build, tiny_config, tokens

import hf_pruning
from hf_pruning.engine import distributed

CALIB = tokens(batch=8, length=16, seed=3)
DATA = tokens(batch=12, length=16, seed=5)  # 3 batches of 4: the order is reshuffled after 3 steps
EVAL = tokens(batch=3, length=16, seed=7)
PROBE = tokens(batch=2, length=12, seed=9)
#: case -> (architecture, recover_ settings); every rank count runs every case. The "_float64" cases train in
#: float64 with larger steps: there the split batch must give the one-process weights to float64 rounding. In
#: float32, Adam's steps carry each run's own rounding (the one-process run is itself ~5e-6 from the float64
#: one), so those cases take smaller steps and are compared with a tolerance of that size.
F32, F64 = {"lr": 1e-3}, {"lr": 1e-2}
CASES = {
    "llama": ("llama", {**F32, "batch_size": 4}),
    "qwen2": ("qwen2", {**F32, "batch_size": 4}),
    "opt": ("opt", {**F32, "batch_size": 4}),
    "llama_uneven": ("llama", {**F32, "batch_size": 5}),  # 2 + 3 rows at 2 ranks: the losses are weighted
    "llama_float64": ("llama", {**F64, "batch_size": 4}),
    "opt_float64": ("opt", {**F64, "batch_size": 4}),
    "llama_uneven_float64": ("llama", {**F64, "batch_size": 5}),
    "llama_checkpointing_float64": ("llama", {**F64, "batch_size": 4, "gradient_checkpointing": True,
                                              "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "llama_one_row": ("llama", {**F32, "batch_size": 1}),  # refused at 2 ranks: a rank would have no row
    "other_data": ("llama", {**F32, "batch_size": 4}),  # rank 1 passes other data: refused at 2 ranks
}
SETTINGS = {"steps": 5, "r": 4, "lora_alpha": 8, "seq_len": 16}


def model_for(case: str, arch: str):
    """The tiny model of ``arch`` (sdpa attention), without dropout (OPT's 0.1 would draw other masks on a split
    batch: equal in distribution only), in float64 for the ``_float64`` cases."""
    config = tiny_config(arch)
    config._attn_implementation = "sdpa"
    config.dropout = 0.0
    model = _build(arch, config, 0)
    return model.double() if case.endswith("_float64") else model


def digest(model) -> str:
    """sha256 of every tensor of the state dict, by name."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_case(case: str) -> dict:
    """Prune, recover and describe the result of ``case`` (or the error it raised)."""
    arch, settings = CASES[case]
    model = model_for(case, arch)
    hf_pruning.prune_(model, hf_pruning.WandaConfig(sparsity=0.5), calibration=CALIB)
    data = DATA.flip(0) if case == "other_data" and distributed.world()[0] == 1 else DATA
    try:
        report = hf_pruning.recover_(model, data, eval_ids=EVAL, **SETTINGS, **settings)
    except Exception as err:  # the same error must come out of every rank
        return {"error": f"{type(err).__name__}: {err}"}
    model.eval()
    with torch.no_grad():
        logits = model(PROBE, use_cache=False).logits
    masks = {name: (p == 0) for name, p in model.named_parameters() if p.dim() == 2}
    keep = {k: v for k, v in report.items() if k not in ("train_s",)}
    return {"report": keep, "digest": digest(model), "masks": masks, "logits": logits,
            "record": model.config.pruning_config, "lora_left": [n for n, _ in model.named_modules() if "lora" in n]}


def main(out: str, *only: str) -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    group = distributed.init_from_env("gloo")
    result = {case: run_case(case) for case in (only or CASES)}
    torch.save(result, os.path.join(out, f"rank{distributed.world()[0]}.pt"))
    if group:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
