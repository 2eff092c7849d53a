"""GradMAP's stage 1: a global importance score per decoder block from gradients of the language-model loss.

The loss (the mean of the calibration rows' losses) is backpropagated one layer at a time
(:func:`.backward.blockwise_backward`: a forward keeping each layer's input, the head once per batch, then each
layer recomputed with gradients from the top down) and each block's score is reduced to a float64 scalar in its
own backward step, so weight gradients never outlive their layer (fp32 accumulators, also for bf16 models):

- ``grad`` (GradMAP's default): mean |dL/dθ| over the block's parameters (normalised per parameter, so blocks
  compare globally);
- ``taylor``: sum over the block of |θ · dL/dθ| (first-order Taylor importance, Shortened-LLaMA style);
- ``output``: the norm of dL/dh over the block's output hidden states;
- ``contribution``: sum over tokens and channels of |dL/dh ⊙ (h_out - h_in)|, the first-order Taylor importance
  of what the block adds to the residual stream, i.e. of the very change its removal makes (removing block l
  replaces h_out by h_in). Per element, so opposite-signed effects on different tokens do not cancel.
- ``fisher``: sum over tokens and channels of (dL/dh ⊙ (h_out - h_in))^2, the diagonal Fisher (second-order)
  estimate of the loss increase from removing the block's update: at a trained model the first-order terms
  average out, and the squared terms weight the large, consistent effects that make a removal costly.

Under a process group each rank backpropagates its own rows (its share of the mean loss, see
:mod:`.backward`): the activation scores are sums over tokens, summed over the ranks in one reduction at the end of
the pass (a float64 per block); the parameter scores are not linear in the gradient, so each layer's gradient
(float64 sums of the per-batch parts) is summed over the ranks in its own step, before it is reduced to a score.

Only the parameters of the remaining decoder blocks get gradients (``grad``/``taylor`` only); embeddings, final
norm and LM head do not. Removed blocks pass their input through, so the loss is that of the pruned model.
"""

from __future__ import annotations

import torch

from ...engine import LAYER_BATCH, calibration_mode, distributed
from ...remote.hf_pruning_surgery import adapter_for
from .backward import LayerGrad, blockwise_backward

SCORES = ("grad", "taylor", "output", "contribution", "fisher")


def check_token_ids(calibration) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.ndim != 2 or calibration.dtype.is_floating_point:
        raise ValueError("gradient scores need the LM loss, so calibration must be token ids [n_samples, seq_len] "
                         "(they are their own labels); build them with hf_pruning.calibration.build_calibration")
    if calibration.shape[1] < 2:
        raise ValueError("calibration rows need at least 2 tokens for a next-token loss")


def gradient_scores(model, calibration: torch.Tensor, skip: set[int], score: str, tuple_out: bool,
                    store_folder: str | bool | None = None, counts: dict | None = None) -> dict[int, float]:
    """Score of every decoder block not in ``skip`` from one blockwise backward pass (lower = less important).
    ``store_folder``: keep the layer inputs and gradients on disk there (``True``: a temporary folder);
    ``counts``: adds the pass's layer forwards and backwards (see :func:`.backward.blockwise_backward`)."""
    on_params = score in ("grad", "taylor")
    acc: dict[int, object] = {}  # layer -> float64 sum (activation scores) or gradient sums (parameter ones)
    # gradient sums: fp32; float64 under a process group (per-batch parts, then summed over the ranks)
    grad_dtype = torch.float64 if distributed.active() else torch.float32
    scores: dict[int, float] = {}

    def visit(step: LayerGrad) -> None:
        i = step.layer
        if on_params:  # sum dL/dθ over the batches; reduced to a scalar after the layer's last batch
            if i not in acc:
                acc[i] = [torch.zeros_like(g, dtype=grad_dtype) for g in step.param_grads]
            for total, g in zip(acc[i], step.param_grads):
                total += g.float()
            if step.batch == n_batches - 1:  # every rank's gradient of this layer: one reduction per parameter
                grads = [distributed.all_sum(g, f"layer {i}'s gradients") if distributed.active() else g
                         for g in acc.pop(i)]
                scores[i] = _parameter_score(layers[i], grads, score)
            return
        g = step.g_out.double()  # [b, T, d] dL/dh_out
        if score == "output":
            term = float(g.pow(2).sum())
        else:
            term = g * (step.h_out.double() - step.h_in.double())  # [b, T, d]: first-order effect per element
            term = float(term.pow(2).sum() if score == "fisher" else term.abs().sum())
        acc[i] = acc.get(i, 0.0) + term

    layers = adapter_for(model).decoder_layers(model)
    n_batches = -(-calibration.shape[0] // LAYER_BATCH)
    with calibration_mode(model):
        kept = blockwise_backward(model, calibration, skip, tuple_out, visit, on_params,
                                  LAYER_BATCH, store_folder, counts)
    if not on_params:
        if distributed.active():  # every rank's sums: one reduction of a float64 per kept block
            sums = distributed.all_sum(torch.tensor([acc.get(i, 0.0) for i in kept], dtype=torch.float64),
                                       "the blocks' gradient scores")
            acc = dict(zip(kept, sums.tolist()))
        scores = {i: acc.get(i, 0.0) ** 0.5 if score == "output" else acc.get(i, 0.0) for i in kept}
    return {i: scores[i] for i in kept}


def _parameter_score(layer, grads: list[torch.Tensor], score: str) -> float:
    """``taylor``: sum |θ · g|; ``grad``: mean |g| over the layer's parameters (``grads``: fp32, the onloaded
    parameters' order)."""
    params = list(layer.parameters())
    if score == "taylor":
        return float(sum(float((p.detach().float() * g).abs().double().sum()) for p, g in zip(params, grads)))
    total = sum(p.numel() for p in params)
    return float(sum(float(g.abs().double().sum()) for g in grads)) / max(total, 1)
