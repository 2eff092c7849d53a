"""Magnitude pruning: in every linear layer of every decoder block, zero the weights with the smallest absolute
value (a fixed fraction per matrix, or N of every M consecutive inputs with an N:M pattern). It looks at the
weights only, so it needs no calibration data; it is the baseline the other mask methods are measured against.
The model keeps its stock class and saves as an ordinary checkpoint.

    python examples/prune_magnitude.py                       # 50% unstructured -> outputs/magnitude
    python examples/prune_magnitude.py --pattern 2:4 --out-dir outputs/magnitude-2-4
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/magnitude",
         sparsity: float = 0.5, pattern: str = "unstructured") -> dict:
    """Zero the smallest weights of every decoder-layer linear; returns the numbers of common.prune_and_evaluate.

    sparsity: fraction of each matrix set to zero (ignored with an N:M pattern, which means N/M).
    pattern: "unstructured", or "N:M" for N zeros in every M consecutive inputs (e.g. "2:4").
    """
    config = hf_pruning.MagnitudeConfig(sparsity=sparsity, pattern=pattern)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir)


if __name__ == "__main__":
    common.cli(main, __doc__)
