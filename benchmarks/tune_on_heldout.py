"""Perplexity of pruning settings on held-out text, for choosing the benchmark grid's settings.

Usage (from the repository root, in the project's virtualenv)::

    python -m benchmarks.tune_on_heldout '{"method": "wanda", "pattern": "2:4"}' \
        '{"method": "llm_barber", "init": "wanda", "pattern": "2:4", "threshold": 0.1}'

    python -m benchmarks.tune_on_heldout --depth '{"method": "gradmap", "num_removals": 4}'

Each argument is a config dict (``PruningConfig.from_dict``). The model is the real SmolLM2-135M
(ASSETS.md), calibrated on the benchmark's calibration tokens (16 x 512 from Persuasion and Sense and
Sensibility, seed 0; with ``--depth``, the depth rows' 4 x 128) and scored on the first 16 windows of 512
tokens of Northanger Abbey: a book in neither the calibration nor the evaluation set, so settings are never
chosen on the evaluation text. One line per config: the config, perplexity, pruning seconds, overall sparsity,
swaps (LLM-Barber), the removal order (depth methods).
"""

from __future__ import annotations

import copy
import json
import sys
import time

import hf_pruning
from benchmarks.assets import load_smollm2
from benchmarks.grid import BenchSettings, books
from hf_pruning.calibration import evaluation_windows
from hf_pruning.evaluation import perplexity

HELD_OUT_BOOKS = ("northangerabbey",)


def main(configs: list[str]) -> None:
    depth = "--depth" in configs
    configs = [c for c in configs if c != "--depth"]
    base, tok = load_smollm2()
    settings = BenchSettings()
    calib = settings.calibration(tok, depth=depth)
    data = settings.data_dir
    held_out = evaluation_windows(tok, books(data, HELD_OUT_BOOKS), 512, 16)
    print("dense", "%.2f" % perplexity(base, held_out), flush=True)
    for text in configs:
        model = copy.deepcopy(base)
        start = time.time()
        hf_pruning.prune_(model, hf_pruning.PruningConfig.from_dict(json.loads(text)), calibration=calib)
        seconds = time.time() - start
        print(text, "ppl %.2f" % perplexity(model, held_out), "time %.1f" % seconds,
              "sp %.4f" % hf_pruning.sparsity_report(model)["overall"], model.hf_pruning_report.get("swapped"),
              model.hf_pruning_report.get("order", ""), flush=True)
        del model


if __name__ == "__main__":
    main(sys.argv[1:])
