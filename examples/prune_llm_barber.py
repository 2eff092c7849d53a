"""LLM-Barber: start from the mask of a one-shot method (magnitude, Wanda or SparseGPT) and rebuild it. With
gradients from the calibration data it scores every weight by |W| x its RMS gradient, then swaps pruned and kept
weights inside each group (a row by default) where that helps, making only the most beneficial ``threshold``
fraction of the swaps. The sparsity stays exactly what was asked for.

    python examples/prune_llm_barber.py                      # Wanda init, 50% -> outputs/llm_barber
    python examples/prune_llm_barber.py --init magnitude --granularity block
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/llm_barber",
         init: str = "wanda", sparsity: float = 0.5, pattern: str = "unstructured", granularity: str = "output1",
         threshold: float = 0.1, n_samples: int = 16, seq_len: int = 512) -> dict:
    """Prune with an initializer, then rebuild the mask with LLM-Barber; returns common.prune_and_evaluate's numbers.

    init: the method that gives the initial mask: magnitude, wanda or sparsegpt.
    sparsity, pattern: as for magnitude pruning.
    granularity: the group inside which pruned and kept weights swap: output1 (a row), input1, layer or block;
        an N:M pattern allows output1 only.
    threshold: fraction of the beneficial swaps actually made.
    n_samples, seq_len: calibration windows for the initializer and the gradients.
    """
    config = hf_pruning.LLMBarberConfig(init=init, sparsity=sparsity, pattern=pattern, granularity=granularity,
                                     threshold=threshold)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
