"""Models bigger than memory: a Llama-3-8B-shaped random model and the real Qwen2.5-Coder-1.5B, pruned with their
weights offloaded (``device_map="auto"``, ``max_memory``, an offload folder) and saved with the streaming save.

    # a Llama-3-8B-shaped checkpoint with random weights (bf16 on disk: 16 GB; 32 GB once loaded as float32)
    python -m benchmarks.scale --make-8b /data/llama3-8b-random
    # prune it with 8 GiB of RAM for weights (the rest read from disk) and save it streamed
    python -m benchmarks.scale --run-8b /data/llama3-8b-random --method wanda --rows 4 --tokens 256
    # the real Qwen2.5-Coder-1.5B in fp32: in memory vs 1 GiB of RAM for weights, same masks?
    python -m benchmarks.scale --qwen --method wanda
    # a small stand-in of the whole path (2 layers, widths / 8) in a temporary folder
    python -m benchmarks.scale --smoke

Each run writes its wall time and peak RSS (VmHWM per phase) into benchmarks/results/scale.{json,md}.
The Qwen comparison runs each side in a fresh process (``--qwen-side``) so that peaks do not mix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .scale_tools import GIB, Phases, digests, llama_config, make_checkpoint, record, zero_fraction

logger = logging.getLogger("benchmarks.scale")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def method_config(method: str, settings: dict | None = None):
    """The config of ``method``: 50% sparsity for the mask methods, the method's defaults otherwise, updated with
    ``settings`` (``--settings '{"num_removals": 2}'``)."""
    from hf_pruning.config import PruningConfig

    base = {"sparsity": 0.5} if method in ("wanda", "sparsegpt", "magnitude") else {}
    return PruningConfig.from_dict({"method": method, **base, **(settings or {})})


def load(path: Path, cpu_memory: str | None, offload_folder: Path | None, dtype: torch.dtype):
    import hf_pruning
    from hf_pruning.engine.streaming import offload_settings

    kwargs = {} if cpu_memory is None else offload_settings(cpu_memory, offload_folder)
    model = hf_pruning.from_pretrained(path, dtype=dtype, **kwargs)
    return model.eval()


def prune_and_save(model, method: str, calibration: torch.Tensor, out: Path | None, phases: Phases,
                   saver: str = "hf_pruning", settings: dict | None = None) -> dict:
    import hf_pruning
    from hf_pruning.engine import is_offloaded

    row = {"offloaded": is_offloaded(model)}
    if method != "none":
        with phases("prune"):
            hf_pruning.prune_(model, method_config(method, settings), calibration)
        row["zero_fraction"] = zero_fraction(model)
    if out is not None:
        with phases("save"):
            if saver == "transformers":  # for comparison: transformers' own save (one whole shard in memory)
                type(model).save_pretrained(model, out)
            elif saver == "release":  # no room on disk for a second copy of the edits: move them into the save
                from hf_pruning.engine.streaming import save_streamed

                row["save_stats"] = vars(save_streamed(model, out, max_shard_size="5GB", release_offload=True))
            else:
                hf_pruning.save_pretrained(model, out, card=False)
    return row


def run_8b(args) -> dict:
    """Load the checkpoint at ``args.run_8b`` offloaded, prune, save streamed; record time and peak RSS."""
    phases = Phases()
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-8b-"))
    offload = work / "offload"
    out = None if args.no_save else Path(args.out or work / "pruned")
    with phases("load"):
        model = load(Path(args.run_8b), args.cpu_memory, offload, DTYPES[args.dtype])
    g = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, model.config.vocab_size, (args.rows, args.tokens), generator=g)
    n = model.num_parameters()
    row = {"model": f"Llama-3-8B-shaped random ({model.config.num_hidden_layers} layers, d={model.config.hidden_size})",
           "parameters": n, "model_gib": n * torch.finfo(DTYPES[args.dtype]).bits / 8 / GIB, "method": args.method,
           "rows": args.rows, "tokens": args.tokens, "max_memory": args.cpu_memory or "all",
           "device_map": sorted(set(getattr(model, "hf_device_map", {}).values()))}
    try:
        row.update(prune_and_save(model, args.method, calibration, out, phases, args.saver))
    except Exception as err:  # recorded: the run is long, its numbers so far are still worth keeping
        row["error"] = f"{type(err).__name__}: {err}"[:500]
        logger.exception("run failed")
    row.update(phases=phases.rows, peak_rss_gib=phases.peak(), peak_anon_gib=phases.peak("peak_anon_gib"),
               note=row.get("error", "")[:80])
    record(args.key or f"8b-{args.method}", row, args.results)
    if not args.keep:
        shutil.rmtree(offload, ignore_errors=True)
    return row


def plan_summary(plan) -> dict:
    """The plan as a SHA-256 of its canonical JSON and its op names (a FLAP plan lists every kept channel: MBs)."""
    text = json.dumps(plan, sort_keys=True)
    ops = [op.get("op", "?") for op in (plan or {}).get("ops", [])]
    return {"plan_sha256": hashlib.sha256(text.encode()).hexdigest(), "plan_ops": ops}


def qwen_side(args) -> dict:
    """One side of the Qwen comparison, in this process: in memory (``--cpu-memory`` unset) or offloaded."""
    from transformers import AutoTokenizer

    from hf_pruning.calibration import build_calibration, default_text

    from .qwen_asset import qwen_path

    path, phases = qwen_path(), Phases()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = build_calibration(tokenizer, default_text("calibration"), args.rows, args.tokens, seed=0)
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-qwen-"))
    with phases("load"):
        cpu_offload = args.cpu_memory == "offload"  # accelerate's CPU offload: weights in a CPU dict, on meta
        model = load(path, None if cpu_offload else args.cpu_memory, work / "offload", torch.float32)
        if cpu_offload:
            from accelerate import cpu_offload as offload

            offload(model, execution_device=torch.device("cpu"))
    n = model.num_parameters()
    row = {"model": "Qwen2.5-Coder-1.5B-Instruct (fp32)", "parameters": n, "model_gib": 4 * n / GIB,
           "method": args.method, "rows": args.rows, "tokens": args.tokens,
           "max_memory": "cpu_offload" if cpu_offload else (args.cpu_memory or "all")}
    out = None if args.no_save else work / "pruned"
    try:
        row.update(prune_and_save(model, args.method, calibration, out, phases, settings=json.loads(args.settings)))
        x = calibration[:1, :16]
        with phases("logits"), torch.no_grad():
            row["logits"] = model(x).logits[0, -1, :64].tolist()
        row["digests"] = digests(model)
        row.update(plan_summary(getattr(model.config, "pruning_plan", None)))
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {err}"[:500]
        logger.exception("run failed")
    row.update(phases=phases.rows, peak_rss_gib=phases.peak(), peak_anon_gib=phases.peak("peak_anon_gib"))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def qwen(args) -> dict:
    """In memory vs offloaded, each in a fresh process; same masks/plan, max logit difference, time and peak RSS."""
    sides = {}
    wanted = args.sides.split(",")
    for side, memory in [s for s in (("memory", None), ("offloaded", args.cpu_memory or "1GiB"),
                                     ("cpu_offload", "offload")) if s[0] in wanted]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result = Path(f.name)
        cmd = [sys.executable, "-m", "benchmarks.scale", "--qwen-side", str(result), "--method", args.method,
               "--rows", str(args.rows), "--tokens", str(args.tokens), "--results", args.results] + (["--cpu-memory", memory] if memory else [])
        cmd += ["--no-save"] if args.no_save else []
        cmd += ["--settings", args.settings]
        subprocess.run(cmd, check=True, cwd=Path(__file__).parent.parent)
        sides[side] = json.loads(result.read_text())
        result.unlink()
    a = sides["memory"]
    errors = [f"{side}: {row['error']}" for side, row in sides.items() if "error" in row]
    for side, row in sides.items():
        if errors:
            row["note"] = "; ".join(errors)[:120]
        elif side != "memory":
            same = a["digests"] == row["digests"] and a["plan_sha256"] == row["plan_sha256"]
            diff = max(abs(x - y) for x, y in zip(a["logits"], row["logits"], strict=True))
            ratio = row["phases"].get("prune", {}).get("seconds", 0) / max(a["phases"].get("prune", {}).get("seconds", 0), 1e-9)
            row.update(same_weights_as_memory=same, max_logit_diff=diff, prune_time_vs_memory=ratio,
                       note=f"identical weights and plan: {same}; logits differ by {diff:.2g}; "
                            f"prune time x{ratio:.2f} of in memory")
    for side, row in sides.items():
        row.pop("digests", None), row.pop("logits", None)
        row["settings"] = json.loads(args.settings)
        record(f"{args.key or 'qwen-' + args.method}-{side}", row, args.results)
    return sides


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make-8b", metavar="PATH", help="write a Llama-3-8B-shaped random checkpoint to PATH")
    mode.add_argument("--run-8b", metavar="PATH", help="prune the checkpoint at PATH offloaded and save it streamed")
    mode.add_argument("--qwen", action="store_true", help="Qwen2.5-Coder-1.5B: in memory vs offloaded")
    mode.add_argument("--qwen-side", metavar="JSON", help=argparse.SUPPRESS)
    mode.add_argument("--smoke", action="store_true", help="the whole path on a small stand-in (2 layers, widths/8)")
    mode.add_argument("--readme", action="store_true", help="only rewrite the README's block from results/scale.json")
    p.add_argument("--layers", type=int, help="--make-8b: fewer decoder layers than 32")
    p.add_argument("--scale-down", type=int, default=1, help="--make-8b: divide every width and the vocab by this")
    p.add_argument("--source-dtype", default="bfloat16", choices=DTYPES, help="--make-8b: dtype on disk")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="--run-8b: dtype the model is loaded in")
    p.add_argument("--method", default="wanda", help="wanda, sparsegpt, magnitude, any method name, or none")
    p.add_argument("--settings", default="{}", help="the method's settings as JSON, e.g. '{\"num_removals\": 2}'")
    p.add_argument("--rows", type=int, default=4, help="calibration rows (default 4)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per row (default 256 for --run-8b, 128 for Qwen)")
    p.add_argument("--results", default="scale", help="results/<name>.{json,md} (default scale)")
    p.add_argument("--cpu-memory", default=None, help="max_memory for weights in RAM, e.g. 8GiB (unset: all in RAM)")
    p.add_argument("--work", help="folder for the offload folder and the pruned model (default: a temporary one)")
    p.add_argument("--out", help="--run-8b: where to save the pruned model (default: WORK/pruned)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--saver", default="hf_pruning", choices=("hf_pruning", "release", "transformers"),
                   help="--run-8b: hf_pruning.save_pretrained (streamed when offloaded), release (streamed, moving the "
                   "edited offloaded weights into the save: no second copy on disk) or transformers' save_pretrained")
    p.add_argument("--keep", action="store_true", help="keep the offload folder")
    p.add_argument("--sides", default="memory,offloaded,cpu_offload",
                   help="--qwen: which runs (memory first: the others are compared with it)")
    p.add_argument("--key", help="name of the row in results/scale.json")
    args = p.parse_args(argv)
    args.tokens = args.tokens or (128 if args.qwen or args.qwen_side else 256)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.make_8b:
        info = make_checkpoint(Path(args.make_8b), llama_config(args.layers, args.scale_down), DTYPES[args.source_dtype])
        print(json.dumps(info))
    elif args.run_8b:
        print(json.dumps(run_8b(args), indent=1))
    elif args.qwen:
        print(json.dumps({k: {x: v.get(x) for x in ("phases", "peak_rss_gib", "note")} for k, v in qwen(args).items()}))
    elif args.qwen_side:
        Path(args.qwen_side).write_text(json.dumps(qwen_side(args)))
    elif args.readme:
        from .scale_tools import RESULTS, write_readme

        write_readme(json.loads((RESULTS / "scale.json").read_text()))
    else:
        smoke(args)


def smoke(args) -> None:
    """The 8B path on a stand-in: make (2 layers, widths / 8), run offloaded, check the save reloads."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "src")
        make_checkpoint(src, llama_config(args.layers or 2, 8), torch.bfloat16)
        ns = argparse.Namespace(**{**vars(args), "run_8b": str(src), "work": tmp, "out": None,
                                   "cpu_memory": args.cpu_memory or "30MB", "key": args.key or f"smoke-{args.method}",
                                   "results": args.results if args.results != "scale" else f"{tmp}/scale-smoke",
                                   "rows": 2, "tokens": 32})
        row = run_8b(ns)
        if "error" not in row and not args.no_save:
            model = AutoModelForCausalLM.from_pretrained(Path(tmp, "pruned"), device_map="auto", dtype="auto")
            assert model.dtype == DTYPES[args.dtype], model.dtype
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
