"""GradMAP's stage 1: a global importance score per decoder block from gradients of the language-model loss.

One backward pass over the calibration rows (accumulated row by row, so memory does not grow with the
calibration size) gives every remaining block's score at once:

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

Only the parameters of the remaining decoder blocks hold gradients; embeddings, final norm and LM head do not.
Removed blocks pass their input through, so the loss is that of the pruned model.
"""

from __future__ import annotations

import torch

from ...calibration import calibration_mode, hooks
from ...remote.hf_pruning_surgery import adapter_for
from ..depth import skipping

SCORES = ("grad", "taylor", "output", "contribution", "fisher")


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
    # "output": sum of squared output gradients; "contribution" / "fisher": sum of |g ⊙ delta| / (g ⊙ delta)^2
    acc = dict.fromkeys(kept, 0.0)
    with calibration_mode(model), skipping(model, skip, tuple_out), hooks() as handles, torch.enable_grad():
        on_hidden = score in ("output", "contribution", "fisher")  # activation scores: no parameter gradients
        params = {i: [] if on_hidden else list(layers[i].parameters()) for i in kept}
        for i in kept:  # calibration_mode froze everything: only the scored blocks get gradients
            for p in params[i]:
                p.requires_grad_(True)
                p.grad = None
        if on_hidden:
            def keep_grad(i):
                def hook(module, args, kwargs, out):
                    hidden = out[0] if isinstance(out, tuple) else out  # [1, T, d]
                    if score == "output":
                        def add(g):  # g: dL/dh_out [1, T, d]
                            acc[i] += float(g.double().pow(2).sum())
                    else:
                        h_in = args[0] if args else kwargs["hidden_states"]  # [1, T, d]
                        delta = (hidden - h_in).detach()  # [1, T, d]: what removing the block takes away

                        def add(g):
                            term = g.double() * delta.double()  # [1, T, d]: first-order effect per element
                            acc[i] += float(term.pow(2).sum() if score == "fisher" else term.abs().sum())
                    hidden.register_hook(add)

                return hook

            for i in kept:
                handles.append(layers[i].register_forward_hook(keep_grad(i), with_kwargs=True))
        n = calibration.shape[0]
        embed = model.get_input_embeddings()
        for row in calibration:  # accumulate: one row's activations at a time
            ids = row[None].to(device)  # [1, T]
            if on_hidden:  # the graph starts at the embeddings, so backward computes activation gradients only
                embeds = embed(ids).detach().requires_grad_(True)  # [1, T, d]
                loss = model(inputs_embeds=embeds, labels=ids, use_cache=False).loss
            else:
                loss = model(ids, labels=ids, use_cache=False).loss
            (loss / n).backward()
        scores = {}
        for i in kept:
            if score == "output":
                scores[i] = acc[i] ** 0.5
            elif score in ("contribution", "fisher"):
                scores[i] = acc[i]
            elif score == "taylor":
                scores[i] = float(sum((p.detach() * p.grad).abs().sum() for p in params[i] if p.grad is not None))
            else:
                total = sum(p.numel() for p in params[i])
                scores[i] = float(sum(p.grad.abs().sum() for p in params[i] if p.grad is not None)) / max(total, 1)
            for p in params[i]:
                p.grad = None
    return scores
