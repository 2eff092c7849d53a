"""GradMAP: rank decoder blocks by a gradient score from one backward pass of the language-model loss (by
default the sum of (dL/dh x what the block adds to the residual stream)^2, a second-order estimate of the cost
of removing it) and remove the lowest-ranked ones (``--mode iterative`` re-scores after every removal). Then,
among the kept layers whose output drifted furthest from the dense model's, at the one whose fit generalises
best, fit a d x d projection that pulls the hidden states back and fuse it into that layer's MLP down
projection, so inference costs nothing extra.

    python examples/prune_gradmap.py                         # 4 of SmolLM2's 30 blocks -> outputs/gradmap
    python examples/prune_gradmap.py --compensate false --score grad --mode iterative
"""

from __future__ import annotations

import common

import hf_pruning


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, out_dir="outputs/gradmap",
         num_removals: int = 4, score: str = "fisher", mode: str = "one_shot", compensate: bool = True,
         n_samples: int = 4, seq_len: int = 128) -> dict:
    """Delete blocks by gradient score and compensate with GradMAP; returns common.prune_and_evaluate's numbers.

    num_removals: how many decoder blocks go.
    score: fisher (sum (dL/dh ⊙ block update)^2), contribution (sum |dL/dh ⊙ block update|), grad
        (mean |dL/dθ|), taylor (sum |θ dL/dθ|) or output (norm of dL/d block output).
    mode: one_shot (rank once) or iterative (re-score after every removal).
    compensate: stage 2, the fused projection; False gives the ranking alone.
    n_samples, seq_len: calibration windows for the gradients and the fit.
    """
    config = hf_pruning.GradMAPConfig(num_removals=num_removals, score=score, mode=mode, compensate=compensate)
    return common.prune_and_evaluate(config, model, tokenizer, calibration, eval_ids, out_dir, n_samples, seq_len)


if __name__ == "__main__":
    common.cli(main, __doc__)
