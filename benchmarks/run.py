"""``python -m benchmarks.run``: the benchmark grid on SmolLM2-135M (``make bench``, ``make bench-quick``) or on
Qwen2.5-Coder-1.5B-Instruct (``make bench-1.5b``).

    python -m benchmarks.run                     # the full grid -> benchmarks/results/smollm2.{json,md}
    python -m benchmarks.run --quick             # a small subset on fewer tokens (under 15 minutes)
    python -m benchmarks.run --model qwen2.5-coder-1.5b   # -> benchmarks/results/qwen2.5-coder-1.5b.{json,md}
    python -m benchmarks.run --out /tmp/r --only dense magnitude:   # only rows whose key contains a string

The run resumes: rows already in the results file (without an error) are skipped. Exit code 1 when a row failed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

import torch

from .assets import load_smollm2, smollm2_path
from .grid import BenchSettings
from .runner import SMOLLM2_DESCRIPTION, BenchmarkRunner

MODELS = ("smollm2", "qwen2.5-coder-1.5b")

logger = logging.getLogger("benchmarks.run")


def _model(name: str, quick: bool):
    """(settings, grid, description, checkpoint folder, loader of (model, tokenizer)) of a benchmark model."""
    if name == "smollm2":
        return (BenchSettings.quick() if quick else BenchSettings()), None, SMOLLM2_DESCRIPTION, smollm2_path, \
            load_smollm2
    from transformers import AutoTokenizer

    import hf_pruning

    from .qwen_asset import qwen_path
    from .qwen_grid import QWEN_GRID, QwenBenchSettings

    def load():
        path = qwen_path()
        return hf_pruning.from_pretrained(path, dtype=torch.bfloat16).eval(), AutoTokenizer.from_pretrained(path)

    settings = QwenBenchSettings.quick() if quick else QwenBenchSettings()
    return settings, QWEN_GRID, "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, dequantized, run in bfloat16)", \
        qwen_path, load


def run_benchmarks(out_dir: str | Path = "benchmarks/results", quick: bool = False, data_dir: str | None = None,
                   name: str | None = None, only: list[str] | None = None, model: str = "smollm2") -> dict:
    """Run the grid on a real model; writes ``<out_dir>/<name>[-quick].json`` and ``.md`` (name: the model's)."""
    settings, grid, description, folder, load = _model(model, quick)
    if data_dir is not None:
        settings.data_dir = data_dir
    runner = BenchmarkRunner(Path(out_dir) / f"{name or model}{'-quick' if quick else ''}.json", settings,
                             quick=quick, grid=grid, only=only, model_name=description, model_dir=folder())
    runner.results["command"] = "make bench" if model == "smollm2" else "make bench-1.5b"
    base, tokenizer = load()

    def load_model():
        return copy.deepcopy(base).eval()

    start = time.perf_counter()
    results = runner.run(load_model, tokenizer)
    logger.info("benchmark finished in %.0f s: %s", time.perf_counter() - start, runner.path)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description="the benchmark grid on SmolLM2-135M (make bench, make bench-quick)")
    parser.add_argument("--quick", action="store_true", help="a small subset on fewer tokens (under 15 minutes)")
    parser.add_argument("--model", choices=MODELS, default="smollm2", help="the real model (default smollm2)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument("--data-dir", default=None, help="folder of the Austen novels (default: ../shared/data/austen)")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="run only the rows whose key (method:{settings json}) contains one of these strings; "
                             "the file's other rows stay")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = run_benchmarks(args.out, quick=args.quick, data_dir=args.data_dir, only=args.only,
                                  model=args.model)
    except (FileNotFoundError, ValueError) as err:  # missing texts or weights: the message names the fix
        sys.stderr.write(f"benchmarks.run: error: {err}\n")
        return 2
    failed = [r["key"] for r in results["rows"] if r.get("error")]
    sys.stdout.write(f"{len(results['rows'])} row(s) in {args.out}; failed: {failed or 'none'}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
