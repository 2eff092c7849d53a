"""SLEB: remove whole decoder blocks greedily. Every remaining block is tried out in turn and the one whose
removal leaves the lowest calibration perplexity goes; then the candidates are scored again on the smaller
model, until the requested number of blocks is gone. The exact search caches the residual stream below each
candidate, so it picks the same blocks as a full forward per candidate at a fraction of the cost.

    python examples/prune_sleb.py                            # 4 of SmolLM2's 30 blocks -> outputs/sleb
    python examples/prune_sleb.py --num-removals 7
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/sleb",
         num_removals: int = 4, search: str = "exact", n_samples: int = 4, seq_len: int = 128) -> dict:
    """Delete blocks greedily by calibration perplexity; returns the numbers of common.prune_and_evaluate.

    num_removals: how many decoder blocks go, each chosen after re-scoring the others.
    search: exact (cached residual stream) or naive (a full forward per candidate); same blocks either way.
    n_samples, seq_len: calibration windows on which perplexity is measured.
    """
    config = hf_pruning.SLEBConfig(num_removals=num_removals, search=search)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
