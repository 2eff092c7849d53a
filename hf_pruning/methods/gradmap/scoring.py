"""GradMAP's stage 1: a global importance score per decoder block from gradients of the language-model loss.

One backward pass over the calibration rows (accumulated row by row, so memory does not grow with the
calibration size) gives every remaining block's score at once:

- ``grad`` (GradMAP's default): mean |dL/dθ| over the block's parameters (normalised per parameter, so blocks
  compare globally);
- ``taylor``: sum over the block of |θ · dL/dθ| (first-order Taylor importance, Shortened-LLaMA style);
- ``output``: the norm of dL/dh over the block's output hidden states.

Only the parameters of the remaining decoder blocks hold gradients; embeddings, final norm and LM head do not.
Removed blocks pass their input through, so the loss is that of the pruned model.
"""

from __future__ import annotations

import torch

from ...calibration import calibration_mode, hooks
from ...remote.hf_pruning_surgery import adapter_for
from ..depth import skipping

SCORES = ("grad", "taylor", "output")


def check_token_ids(calibration) -> None:
    if not isinstance(calibration, torch.Tensor) or calibration.ndim != 2 or calibration.dtype.is_floating_point:
        raise ValueError("gradient scores need the LM loss, so calibration must be token ids [n_samples, seq_len] "
                         "(they are their own labels); build them with hf_pruning.calibration.build_calibration")
    if calibration.shape[1] < 2:
        raise ValueError("calibration rows need at least 2 tokens for a next-token loss")


def gradient_scores(model, calibration: torch.Tensor, skip: set[int], score: str, tuple_out: bool) -> dict[int, float]:
    """Score of every decoder block not in ``skip`` from one accumulated backward pass (lower = less important)."""
    layers = adapter_for(model).decoder_layers(model)
    kept = [i for i in range(len(layers)) if i not in skip]
    device = next(model.parameters()).device
    out_sq = dict.fromkeys(kept, 0.0)
    with calibration_mode(model), skipping(model, skip, tuple_out), hooks() as handles, torch.enable_grad():
        params = {i: list(layers[i].parameters()) for i in kept}
        for i in kept:  # calibration_mode froze everything: only the scored blocks get gradients
            for p in params[i]:
                p.requires_grad_(True)
                p.grad = None
        if score == "output":
            def keep_grad(i):
                def hook(module, args, out):
                    hidden = out[0] if isinstance(out, tuple) else out
                    hidden.register_hook(lambda g: out_sq.__setitem__(i, out_sq[i] + float(g.double().pow(2).sum())))

                return hook

            for i in kept:
                handles.append(layers[i].register_forward_hook(keep_grad(i)))
        n = calibration.shape[0]
        for row in calibration:  # accumulate: one row's activations at a time
            ids = row[None].to(device)
            (model(ids, labels=ids, use_cache=False).loss / n).backward()
        scores = {}
        for i in kept:
            if score == "output":
                scores[i] = out_sq[i] ** 0.5
            elif score == "taylor":
                scores[i] = float(sum((p.detach() * p.grad).abs().sum() for p in params[i] if p.grad is not None))
            else:
                total = sum(p.numel() for p in params[i])
                scores[i] = float(sum(p.grad.abs().sum() for p in params[i] if p.grad is not None)) / max(total, 1)
            for p in params[i]:
                p.grad = None
    return scores
