"""Wanda: score each weight by |weight| times the norm of the input feature it multiplies, measured on a few
calibration sequences, and zero the lowest-scoring weights within each output row. Layers are pruned one after
another, each on the inputs the already pruned layers below it produce. No weight is updated, only masked.

    python examples/prune_wanda.py                           # 50% unstructured -> outputs/wanda
    python examples/prune_wanda.py --pattern 2:4 --n-samples 32
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/wanda",
         sparsity: float = 0.5, pattern: str = "unstructured", n_samples: int = 16, seq_len: int = 512) -> dict:
    """Prune with Wanda; returns the numbers of common.prune_and_evaluate.

    sparsity, pattern: as for magnitude pruning (zeros chosen per output row).
    n_samples, seq_len: calibration windows of the embedded default text that measure input norms.
    """
    config = hf_pruning.WandaConfig(sparsity=sparsity, pattern=pattern)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
