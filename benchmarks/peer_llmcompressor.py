"""Prune a local model with llm-compressor's SparseGPT or Wanda on given calibration token ids, save it dense.

    <peer venv>/bin/python -I benchmarks/peer_llmcompressor.py --model DIR --calibration IDS.pt \
        --method {sparsegpt,wanda} (--sparsity 0.5 | --pattern 2:4) --dtype {float32,bfloat16} \
        --out DIR --report REPORT.json [--ignore re:.*lm_head ...] [--threads N]

Runs in llm-compressor's own virtualenv (it pins its own transformers), so it imports neither hf_pruning nor the
benchmarks; ``benchmarks/peer.py`` builds the command and reads the report. ``-I`` keeps this folder off
``sys.path`` (its modules' names must not shadow the peer's imports).

What the peer is given, and how it is checked:

* the token ids ``[n, T]`` (int64, ``torch.save``) become a ``datasets.Dataset`` of ``input_ids`` and
  ``attention_mask`` rows. llm-compressor uses a dataset that already has ``input_ids`` as it is (no
  tokenization); with ``shuffle_calibration_samples=False``, ``batch_size=1``, ``num_calibration_samples=n`` and
  ``max_seq_length=T`` its sampler keeps every row and its collator cuts nothing. A hook on the input embedding
  records the rows the model is actually run on; the report says whether they are exactly the calibration rows.
* the recipe ignores ``--ignore`` (default ``re:.*lm_head``): the modifiers match the target ``Linear`` by the
  module itself and then name it ``<module>.``, so the head is reached as ``lm_head.``, which a plain
  ``"lm_head"`` does not match, and a head tied to the embedding would be pruned with it.
* only ``oneshot`` is timed (the model is loaded and the dataset built before, the model saved after).
* before saving: every pruned linear's fraction of exact zeros (min / max, and the N:M pattern when one was
  asked for) and the head and embedding unchanged (zero fraction and sums as before). A failed check writes the
  report and exits 1 without saving the model.
* the model is saved dense (``save_compressed=False``) so plain transformers reloads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

logger = logging.getLogger("peer_llmcompressor")

MODIFIERS = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IGNORE = ["re:.*lm_head"]
SPARSITY_TOLERANCE = 0.01  # allowed |zero fraction - target| for a pruned linear
RECORDED_FIELDS = ("sparsity", "mask_structure", "block_size", "dampening_frac", "preserve_sparsity_mask",
                   "offload_hessians", "sparsity_profile", "targets", "ignore")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local model folder (safetensors)")
    p.add_argument("--calibration", required=True, help="torch file: int64 token ids [n, T]")
    p.add_argument("--method", required=True, choices=sorted(MODIFIERS))
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="unstructured sparsity, e.g. 0.5")
    target.add_argument("--pattern", help="N:M pattern, e.g. 2:4")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--out", required=True, help="folder for the pruned model (dense safetensors) and tokenizer")
    p.add_argument("--report", required=True, help="JSON report (written atomically)")
    p.add_argument("--ignore", nargs="+", default=IGNORE,
                   help="modules the recipe leaves dense: names, 're:' regexes or class names (default: the head)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    return p.parse_args(argv)


def sparsity_target(args: argparse.Namespace) -> tuple[float, str]:
    """The modifier's ``sparsity`` and ``mask_structure``: unstructured is ``0:0``, N:M is N/M of zeros."""
    if args.pattern is None:
        return float(args.sparsity), "0:0"
    n, m = (int(x) for x in args.pattern.split(":"))
    if not 0 < n < m:
        raise SystemExit(f"--pattern must be N:M with 0 < N < M, got {args.pattern}")
    return n / m, f"{n}:{m}"


def make_modifier(method: str, sparsity: float, mask_structure: str, ignore: list[str]):
    """The recipe: one modifier with the peer's defaults except sparsity, mask structure and what it ignores."""
    import llmcompressor.modifiers.pruning as pruning

    return getattr(pruning, MODIFIERS[method])(sparsity=sparsity, mask_structure=mask_structure, ignore=list(ignore))


def modifier_settings(modifier) -> dict:
    """The modifier's settings as it holds them (defaults included), JSON-ready."""
    return {k: getattr(modifier, k) for k in RECORDED_FIELDS if hasattr(modifier, k)}


def load_model(folder: str, dtype: torch.dtype):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # the keyword's name before 4.56
    model = AutoModelForCausalLM.from_pretrained(folder, **{key: dtype})
    return model.eval(), AutoTokenizer.from_pretrained(folder)


def calibration_dataset(ids: torch.Tensor):
    """A ``datasets.Dataset`` with one row per calibration sequence: ``input_ids`` and an all-ones mask."""
    from datasets import Dataset

    rows = ids.tolist()  # n lists of T ints
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


class RowRecorder:
    """Forward pre-hook on the input embedding: the token rows the model is run on (one entry per call and row)."""

    def __init__(self, model):
        self.rows: list[tuple[int, ...]] = []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self)

    def __call__(self, _module, args):
        ids = args[0] if args else None
        if isinstance(ids, torch.Tensor):  # not a tracing proxy
            self.rows.extend(tuple(r) for r in ids.reshape(-1, ids.shape[-1]).tolist())

    def summary(self, ids: torch.Tensor) -> dict:
        """How the rows seen compare with the calibration rows ``ids`` ``[n, T]``."""
        self.handle.remove()
        wanted = [tuple(r) for r in ids.tolist()]
        distinct = set(self.rows)
        return {"calibration_rows": len(wanted), "row_tokens": ids.shape[1], "embedding_rows_run": len(self.rows),
                "distinct_rows_seen": len(distinct), "all_rows_seen": set(wanted) <= distinct,
                "foreign_rows": len(distinct - set(wanted)), "first_pass_in_order": self.rows[: len(wanted)] == wanted,
                "ok": distinct == set(wanted) and len(distinct) == len(wanted)}


def weight_digest(w: torch.Tensor) -> dict:
    """Zero fraction and float64 sums of a weight: enough to tell whether it changed."""
    w64 = w.detach().double()
    return {"zero_fraction": (w == 0).double().mean().item(), "sum": w64.sum().item(),
            "sum_sq": w64.square().sum().item()}


def head_and_embedding(model) -> dict:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings().weight
    return {"tied": head is not None and head.weight.data_ptr() == emb.data_ptr(),
            "embedding": weight_digest(emb), "lm_head": weight_digest(head.weight) if head is not None else None}


def ignored(name: str, module: torch.nn.Module, ignore: list[str]) -> bool:
    """Whether the modifiers skip ``module``: they see a target linear as ``<name>.`` and match an entry as a
    ``re:`` regex from the start, an exact name or one of the module's class names."""
    seen = name + "."
    classes = {c.__name__ for c in type(module).__mro__}
    return any(re.match(e[3:], seen) if e.startswith("re:") else e == seen or e in classes for e in ignore)


def pruned_linears(model, ignore: list[str]) -> dict[str, torch.nn.Linear]:
    """The linears the recipe prunes: every ``Linear`` (the modifiers' target) not ignored."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not ignored(name, m, ignore)}


def nm_violations(w: torch.Tensor, n: int, m: int) -> int:
    """Groups of ``m`` consecutive input weights (per output row) with fewer than ``n`` zeros (a row that does not
    split into groups of ``m`` counts as one)."""
    if w.shape[1] % m:
        return w.shape[0]
    zeros = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)  # [out, in / m]
    return int((zeros < n).sum())


def sparsity_checks(model, before: dict, sparsity: float, mask_structure: str, ignore: list[str]) -> dict:
    """Zero fractions of the pruned linears and whether the head and embedding are as ``before``."""
    linears = pruned_linears(model, ignore)
    fractions = {name: (lin.weight == 0).double().mean().item() for name, lin in linears.items()}
    n, m = (int(x) for x in mask_structure.split(":"))
    violations = sum(nm_violations(lin.weight, n, m) for lin in linears.values()) if m else 0
    after = head_and_embedding(model)
    low, high = min(fractions.values()), max(fractions.values())
    checks = {"pruned_linears": len(fractions), "zero_fraction_min": low, "zero_fraction_max": high,
              "zero_fraction_min_layer": min(fractions, key=fractions.get),
              "zero_fraction_max_layer": max(fractions, key=fractions.get),
              "nm_violations": violations if m else None,
              "head_before": before, "head_after": after, "head_untouched": after == before}
    checks["sparsity_ok"] = max(abs(low - sparsity), abs(high - sparsity)) <= SPARSITY_TOLERANCE and violations == 0
    return checks


def versions() -> dict:
    import compressed_tensors
    import datasets
    import llmcompressor
    import transformers

    return {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__, "torch": torch.__version__,
            "python": sys.version.split()[0]}


def write_json(path: str | os.PathLike, data: dict) -> None:
    """``data`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def run_oneshot(model, tokenizer, ids: torch.Tensor, modifier) -> tuple[float, float]:
    """llm-compressor's ``oneshot`` on exactly the rows of ``ids`` ``[n, T]``; returns its wall-clock seconds and
    the process's CPU seconds (all threads) over the same span, which tells a busy machine from a slow method."""
    from llmcompressor import oneshot

    dataset = calibration_dataset(ids)
    n, t = ids.shape
    start, cpu = time.perf_counter(), time.process_time()
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=[modifier], num_calibration_samples=n,
            max_seq_length=t, shuffle_calibration_samples=False, batch_size=1, output_dir=None)
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = torch.load(args.calibration, weights_only=True)  # [n, T]
    if ids.dtype != torch.int64 or ids.dim() != 2:
        raise SystemExit(f"{args.calibration}: expected int64 token ids [n, T], got {ids.dtype} {tuple(ids.shape)}")
    sparsity, mask_structure = sparsity_target(args)
    modifier = make_modifier(args.method, sparsity, mask_structure, args.ignore)
    model, tokenizer = load_model(args.model, DTYPES[args.dtype])
    before = head_and_embedding(model)
    recorder = RowRecorder(model)
    logger.info("oneshot %s %s on %d x %d tokens, %d threads", args.method, mask_structure, *ids.shape,
                torch.get_num_threads())
    seconds, cpu_seconds = run_oneshot(model, tokenizer, ids, modifier)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB
    from llmcompressor.pipelines import CalibrationPipeline

    report = {"peer": "llm-compressor", "method": args.method, "model": str(args.model), "dtype": args.dtype,
              "target": {"sparsity": args.sparsity} if args.pattern is None else {"pattern": args.pattern},
              "modifier": type(modifier).__name__, "modifier_settings": modifier_settings(modifier),
              "pipeline": CalibrationPipeline._infer_pipeline([modifier]),
              # peak_rss_mb: the whole process's peak (MiB), model loading included
              "oneshot_s": seconds, "oneshot_cpu_s": cpu_seconds, "peak_rss_mb": peak_rss_mb,
              "torch_threads": torch.get_num_threads(),
              "versions": versions(), "rows": recorder.summary(ids),
              "checks": sparsity_checks(model, before, sparsity, mask_structure, args.ignore)}
    report["checks_passed"] = bool(report["rows"]["ok"] and report["checks"]["sparsity_ok"]
                                   and report["checks"]["head_untouched"])
    if not report["checks_passed"]:
        write_json(args.report, report)
        logger.error("checks failed, model not saved: %s", json.dumps({"rows": report["rows"], **report["checks"]}))
        return 1
    model.save_pretrained(args.out, save_compressed=False)  # llm-compressor's wrapper; dense safetensors
    tokenizer.save_pretrained(args.out)
    report["out"] = str(args.out)
    write_json(args.report, report)
    logger.info("oneshot %.1f s, zero fractions %.4f..%.4f, saved %s", seconds,
                report["checks"]["zero_fraction_min"], report["checks"]["zero_fraction_max"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
