"""FLAP (MLP channels only): score every intermediate channel of every MLP by how much its activation
fluctuates over the calibration tokens, weighted by the squared norm of its down-projection column. Scores
are standardised per layer and one global threshold picks the channels to remove, so layers lose different
widths; each removed channel's mean contribution is added to the down projection's bias.

    python examples/prune_flap.py                            # 8.33% of decoder parameters -> outputs/flap
    python examples/prune_flap.py --param-ratio 0.2 --metric wifn
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/flap",
         param_ratio: float = 0.0833, metric: str = "wifv", bias: bool = True,
         n_samples: int = 16, seq_len: int = 512) -> dict:
    """Remove MLP channels with FLAP; returns the numbers of common.prune_and_evaluate.

    param_ratio: fraction of decoder-layer parameters to remove (one global threshold decides where).
    metric: wifv (fluctuation x squared column norm), ifv (fluctuation) or wifn (|W| x input norm).
    bias: fold each removed channel's mean output into the down projection's bias.
    n_samples, seq_len: calibration windows on which the fluctuation is measured.
    """
    config = hf_pruning.FLAPConfig(param_ratio=param_ratio, metric=metric, bias=bias)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
