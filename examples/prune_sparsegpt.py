"""SparseGPT: prune each linear layer by solving a layer-wise reconstruction problem. From the calibration
inputs it builds the layer's Hessian (X Xᵀ), chooses the mask block of columns by block, and updates the
weights that stay so that the layer's output on those inputs changes as little as possible.

    python examples/prune_sparsegpt.py                       # 50% unstructured -> outputs/sparsegpt
    python examples/prune_sparsegpt.py --pattern 4:8 --blocksize 64
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/sparsegpt",
         sparsity: float = 0.5, pattern: str = "unstructured", blocksize: int = 128, percdamp: float = 0.01,
         n_samples: int = 16, seq_len: int = 512) -> dict:
    """Prune with SparseGPT; returns the numbers of common.prune_and_evaluate.

    sparsity, pattern: as for magnitude pruning.
    blocksize: columns whose mask is chosen together (a multiple of M with an N:M pattern).
    percdamp: Hessian dampening, as a fraction of its mean diagonal.
    n_samples, seq_len: calibration windows from which the Hessians are built.
    """
    config = hf_pruning.SparseGPTConfig(sparsity=sparsity, pattern=pattern, blocksize=blocksize, percdamp=percdamp)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
