"""ShortGPT: one forward pass over the calibration data measures each decoder block's Block Influence, one
minus the cosine similarity between the hidden states entering and leaving it. The blocks that change the
residual stream least are deleted in one shot. The result is the stock architecture with fewer layers.

    python examples/prune_shortgpt.py                        # 4 of SmolLM2's 30 blocks -> outputs/shortgpt
    python examples/prune_shortgpt.py --num-removals 7 --compensate true
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/shortgpt",
         num_removals: int = 4, compensate: bool = False, n_samples: int = 4, seq_len: int = 128) -> dict:
    """Delete the least influential blocks with ShortGPT; returns the numbers of common.prune_and_evaluate.

    num_removals: how many decoder blocks go.
    compensate: afterwards fuse GradMAP's projection into the layer that drifted most.
    n_samples, seq_len: calibration windows for the block influence.
    """
    config = hf_pruning.ShortGPTConfig(num_removals=num_removals, compensate=compensate)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
