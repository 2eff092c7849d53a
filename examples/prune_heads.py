"""Uniform attention-head pruning: score every head (by weight magnitude, or Wanda-style by |W| times the
norm of its input on calibration data) and remove the same number of the lowest-scoring units from every
layer. A unit is a whole KV group with its query heads, which shrinks the KV cache, or single query heads.

    python examples/prune_heads.py                           # one KV group per layer -> outputs/heads
    python examples/prune_heads.py --score wanda --unit query --per-layer 2
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/heads",
         per_layer: int = 1, score: str = "magnitude", unit: str = "group",
         n_samples: int = 16, seq_len: int = 512) -> dict:
    """Remove the same number of attention units from every layer; returns common.prune_and_evaluate's numbers.

    per_layer: units removed in every layer.
    score: magnitude (weights only; the better of the two on SmolLM2 in benchmarks/results/smollm2.md) or
        wanda (|W| x input norm on the calibration windows).
    unit: group (a KV head with its query heads: the KV cache shrinks) or query (query heads only).
    n_samples, seq_len: calibration windows for the wanda score (unused with magnitude).
    """
    config = hf_pruning.HeadsConfig(per_layer=per_layer, score=score, unit=unit)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
