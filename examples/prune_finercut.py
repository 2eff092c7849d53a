"""FinerCut: treat every attention sublayer and every MLP sublayer as a separate candidate for removal. At
each step it removes the candidate whose absence changes the model's next-token distribution on the
calibration data least (a Jensen-Shannon divergence by default), then searches again, until the budget is
spent. Attention sublayers tend to go first, which also shrinks the KV cache.

    python examples/prune_finercut.py                        # 25% of the 60 sublayers -> outputs/finercut
    python examples/prune_finercut.py --sublayer-ratio 0.1 --search fast
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/finercut",
         sublayer_ratio: float = 0.25, granularity: str = "sublayer", metric: str = "js_code",
         search: str = "exact", n_samples: int = 4, seq_len: int = 128) -> dict:
    """Remove attention/MLP sublayers with FinerCut; returns the numbers of common.prune_and_evaluate.

    sublayer_ratio: fraction of the candidates removed (the paper's budget).
    granularity: the candidates: sublayer (attention and MLP), attention, mlp or block.
    metric: what "changes least" means: js_code, js, kl, angular, norm or ppl.
    search: exact (the full search's order with less work), fast (screen on a prefix) or naive.
    n_samples, seq_len: calibration windows scored for every candidate.
    """
    config = hf_pruning.FinerCutConfig(sublayer_ratio=sublayer_ratio, granularity=granularity, metric=metric,
                                       search=search)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
