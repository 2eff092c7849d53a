"""Data-parallel calibration: 1 process vs 2 processes (torchrun, gloo, one thread each) on the real
Qwen2.5-Coder-1.5B, with the same results.

    python -m benchmarks.distributed                      # Wanda, SparseGPT and SLEB, 1 and 2 processes
    python -m benchmarks.distributed --methods wanda --layers 28 --rows 16
    python -m benchmarks.distributed --readme             # only rewrite the README block from the results

A run with the same model settings as the committed results replaces the rows of the methods it ran and keeps
the others.

Each (method, process count) is one ``torchrun --nproc_per_node N -m benchmarks.distributed --rank-run ...``
launch: every rank loads the model (not timed), takes the same calibration, waits for the others, then
``prune_`` is timed on each rank (the row is the slowest rank's time). Rank 0 then writes the masks'
digest, the plan and logits on a probe, so that the 2-process result can be compared with the 1-process one.
``--layers K`` keeps the model's first K decoder layers (real weights, head kept): the run time is per layer,
so a full-depth run scales with K. Results: ``results/distributed.{json,md}`` and the README's block.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
SETTINGS = {"wanda": {"method": "wanda", "sparsity": 0.5}, "sparsegpt": {"method": "sparsegpt", "sparsity": 0.5},
            "sleb": {"method": "sleb", "num_removals": 2}}
logger = logging.getLogger("benchmarks.distributed")


def rank_run(args) -> None:
    """One rank of one launch (inside torchrun)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_pruning
    from hf_pruning.calibration import build_calibration, default_text
    from hf_pruning.engine import distributed

    from .qwen_asset import qwen_path

    torch.set_num_threads(1)
    distributed.init_from_env("gloo")
    rank, size = distributed.world()
    path = qwen_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype),
                                                 num_hidden_layers=args.layers)
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = build_calibration(tokenizer, default_text("calibration"), args.rows, args.tokens, seed=0)
    distributed.barrier("every rank to load the model")
    start = time.perf_counter()
    hf_pruning.prune_(model, dict(SETTINGS[args.method]), calibration=calibration)
    seconds = max(distributed.gather_objects(time.perf_counter() - start, "the times"))
    if rank != 0:
        return
    masks = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.dim() == 2:
            masks.update(name.encode() + (p == 0).numpy().tobytes())
    with torch.no_grad():
        logits = model(calibration[:1, :32]).logits[0, -1].float()
    torch.save(logits, Path(args.rank_run).with_suffix(".logits.pt"))
    Path(args.rank_run).write_text(json.dumps({
        "seconds": round(seconds, 2), "processes": size, "masks_sha256": masks.hexdigest(),
        "plan": hf_pruning.get_plan(model).to_json(), "zeros": sum(int((p == 0).sum()) for p in model.parameters()),
    }))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, method: str, processes: int, folder: Path) -> dict:
    """One torchrun launch; returns rank 0's row (plus the logits file's path)."""
    out = folder / f"{method}-{processes}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), "-m", "benchmarks.distributed", "--rank-run", str(out),
           "--method", method, "--layers", str(args.layers), "--rows", str(args.rows), "--tokens",
           str(args.tokens), "--dtype", args.dtype]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_PRUNING_DIST_TIMEOUT": "3600"}
    logger.info("%s with %d process(es)", method, processes)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} x {processes} failed:\n{done.stderr[-4000:]}")
    row = json.loads(out.read_text())
    row["logits"] = str(out.with_suffix(".logits.pt"))
    return row


def compare(args) -> dict:
    """Every method with 1 and 2 processes; the rows for results/distributed.json."""
    folder = Path(tempfile.mkdtemp(prefix="distributed-bench-"))
    rows = {}
    for method in args.methods.split(","):
        one, two = (launch(args, method, n, folder) for n in (1, 2))
        diff = (torch.load(one.pop("logits")) - torch.load(two.pop("logits"))).abs().max().item()
        rows[method] = {"settings": SETTINGS[method], "seconds_1": one["seconds"], "seconds_2": two["seconds"],
                        "speedup": round(one["seconds"] / two["seconds"], 2),
                        "same_masks": one["masks_sha256"] == two["masks_sha256"], "same_plan": one["plan"] == two["plan"],
                        "max_logit_diff": diff, "zeros": [one["zeros"], two["zeros"]]}
        logger.info("%s: %s", method, rows[method])
    return {"model": "Qwen2.5-Coder-1.5B-Instruct", "layers": args.layers, "dtype": args.dtype, "rows": args.rows,
            "tokens": args.tokens, "threads_per_process": 1, "backend": "gloo", "device": "cpu",
            "machine": f"{os.cpu_count()} CPU cores", "methods": rows}


def table(data: dict) -> list[str]:
    """The results as markdown lines (results/distributed.md and the README block)."""
    lines = [f"{data['model']}, first {data['layers']} decoder layers (real weights, {data['dtype']}), "
             f"{data['rows']} x {data['tokens']} calibration tokens, {data['backend']} on {data['machine']}, one "
             "thread per process. Target: 2 processes >= 1.7x faster than 1 for Wanda and SparseGPT.", "",
             "| method | 1 process s | 2 processes s | speed-up | same masks | same plan | max logit diff |",
             "|---|---|---|---|---|---|---|"]
    for method, r in data["methods"].items():
        lines.append(f"| {method} | {r['seconds_1']} | {r['seconds_2']} | {r['speedup']}x | {r['same_masks']} | "
                     f"{r['same_plan']} | {r['max_logit_diff']:.2g} |")
    return lines


def write(data: dict) -> None:
    from .readme import replace_block

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (RESULTS / "distributed.md").write_text("# Data-parallel calibration (benchmarks/distributed.py)\n\n"
                                            + "\n".join(table(data)) + "\n")
    replace_block("distributed", table(data))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="wanda,sparsegpt,sleb")
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--rank-run", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=8, help="first K decoder layers of the 28 (default 8)")
    p.add_argument("--rows", type=int, default=16, help="calibration rows (default 16: 2 batches of 4 per process)")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--readme", action="store_true", help="only rewrite the README block from the results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.rank_run:
        rank_run(args)
    elif args.readme:
        write(json.loads((RESULTS / "distributed.json").read_text()))
    else:
        data, path = compare(args), RESULTS / "distributed.json"
        old = json.loads(path.read_text()) if path.is_file() else None
        if old and all(old.get(k) == data[k] for k in ("layers", "rows", "tokens", "dtype")):
            data["methods"] = {**old["methods"], **data["methods"]}  # a rerun of some methods keeps the others
        write(data)


if __name__ == "__main__":
    main()
