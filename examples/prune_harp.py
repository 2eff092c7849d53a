"""HARP: in the top decoder layers, replace attention by its value path alone: the query and key projections
are deleted, every token attends only to itself, and the layer keeps no KV cache. Each such layer's
contribution is scaled by an alpha found by a greedy top-down search over a grid (0 removes the sublayer)
that minimises calibration perplexity. Optionally FLAP then trims MLP channels as well.

    python examples/prune_harp.py                            # top 10 of SmolLM2's 30 layers -> outputs/harp
    python examples/prune_harp.py --num-layers 8 --flap-match true
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/harp",
         num_layers: int = 10, grid: list[float] | None = None, flap_match: bool = False,
         n_samples: int = 4, seq_len: int = 128) -> dict:
    """Make the top layers value-only with searched scales (HARP); returns common.prune_and_evaluate's numbers.

    num_layers: how many of the top decoder layers lose Q and K.
    grid: the alphas the search tries per layer (default 0.0, 0.1, ..., 1.0).
    flap_match: also remove MLP channels with FLAP until the total equals uniform head pruning at the same
        KV-cache saving.
    n_samples, seq_len: calibration windows on which the search measures perplexity.
    """
    config = hf_pruning.HARPConfig(num_layers=num_layers, flap_match=flap_match, grid=grid)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
