"""Taylor block importance: a single backward pass of the language-modelling loss on the calibration data
gives every parameter's first-order Taylor term |θ · ∂L/∂θ|; summed over a block, it estimates how much the
loss would rise without that block. The least important blocks are removed in one shot, here until a share of the
parameters is gone.

    python examples/prune_taylor.py                          # 13.3% of decoder parameters -> outputs/taylor
    python examples/prune_taylor.py --param-ratio 0.2333 --compensate true
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/taylor",
         param_ratio: float = 0.1333, compensate: bool = False, n_samples: int = 4, seq_len: int = 128) -> dict:
    """Delete the blocks of lowest Taylor importance; returns the numbers of common.prune_and_evaluate.

    param_ratio: blocks are removed, least important first, until at least this fraction of the decoder-layer
        parameters is gone (0.1333 = 4 of SmolLM2's 30 blocks); all are ranked by one backward pass.
    compensate: True adds GradMAP's stage 2 (a d x d projection, fitted on the calibration windows and
        fused into one MLP) after the removal.
    n_samples, seq_len: the calibration windows of the backward pass and of the fit.
    """
    config = hf_pruning.TaylorConfig(param_ratio=param_ratio, compensate=compensate)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
