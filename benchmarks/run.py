"""``python -m benchmarks.run``: the benchmark grid on SmolLM2-135M (``make bench``, ``make bench-quick``).

    python -m benchmarks.run                     # the full grid -> benchmarks/results/smollm2.{json,md}
    python -m benchmarks.run --quick             # a small subset on fewer tokens (under 15 minutes)
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

from .assets import load_smollm2
from .grid import BenchSettings
from .runner import BenchmarkRunner

logger = logging.getLogger("benchmarks.run")


def run_benchmarks(out_dir: str | Path = "benchmarks/results", quick: bool = False, data_dir: str | None = None,
                   name: str = "smollm2", only: list[str] | None = None) -> dict:
    """Run the grid on the real SmolLM2 model; writes ``<out_dir>/<name>[-quick].json`` and ``.md``."""
    settings = BenchSettings.quick() if quick else BenchSettings()
    if data_dir is not None:
        settings.data_dir = data_dir
    runner = BenchmarkRunner(Path(out_dir) / f"{name}{'-quick' if quick else ''}.json", settings, quick=quick,
                             only=only)
    base, tokenizer = load_smollm2()

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
    parser.add_argument("--out", default="benchmarks/results", help="results folder")
    parser.add_argument("--data-dir", default=None, help="folder of the Austen novels (default: ../shared/data/austen)")
    parser.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                        help="run only the rows whose key (method:{settings json}) contains one of these strings; "
                             "the file's other rows stay")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        results = run_benchmarks(args.out, quick=args.quick, data_dir=args.data_dir, only=args.only)
    except (FileNotFoundError, ValueError) as err:  # missing texts or weights: the message names the fix
        sys.stderr.write(f"benchmarks.run: error: {err}\n")
        return 2
    failed = [r["key"] for r in results["rows"] if r.get("error")]
    sys.stdout.write(f"{len(results['rows'])} row(s) in {args.out}; failed: {failed or 'none'}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
