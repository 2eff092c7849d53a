"""Orchestration of LLM-Barber, layer by layer, holding the dense copy of ONE decoder layer at a time.

For each layer (onloaded once by the engine): keep a dense float32 copy of the layer, apply the initializer to
the live layer (sparse-path inputs), then for the attention block and then the MLP block: capture the sparse
block's inputs and outputs into activation stores (one batch on the device at a time), take gradients of the
block error at the dense weights, score, swap mask entries per group, and write dense values (or SparseGPT's)
under the new mask through ``write_param``. Finally the layer's outputs become the next layer's inputs.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from ...accounting import prunable_linears, sparsity_report
from ...engine import ActivationStore, execution_device, propagate, write_param
from ...registry import PruningResult, register_method
from ...remote.hf_pruning_surgery import adapter_for
from ..magnitude.pruner import magnitude_prune_layer_
from ..masks.layerwise import check_widths, sequential
from ..masks.replay import replayed
from ..masks.selection import rebuild_masks
from ..sparsegpt.pruner import sparsegpt_prune_layer_
from ..wanda.pruner import wanda_prune_layer_
from .blocks import (
    block_forward,
    block_linears,
    blocks_of,
    capture_block_io,
    out_linear_name,
    pairs,
    reconstruct_block_,
    verify_block_,
)
from .config import LLMBarberConfig
from .scoring import barber_scores, block_gradient_sq

logger = logging.getLogger(__name__)

# module-level names the tests replace: the block steps are looked up here when a layer runs
_reconstruct_block_, _replayed = reconstruct_block_, replayed

#: attributes accelerate's hooks put on a module (the hook with its weights map, the wrapped forward)
_HOOK_ATTRS = ("_hf_hook", "_old_forward", "forward")


def _dense_copy(layer):
    """A float32 copy of ``layer`` (onloaded) without accelerate's hooks: their weights maps, which may hold
    the whole model's offloaded weights, are not copied."""
    hooked = [m for m in layer.modules() if "_hf_hook" in vars(m)]
    memo = {id(vars(m)[a]): None for m in hooked for a in _HOOK_ATTRS if a in vars(m)}
    dense = copy.deepcopy(layer, memo)
    for m in dense.modules():
        if "_hf_hook" in vars(m):
            for a in _HOOK_ATTRS:
                vars(m).pop(a, None)
    return dense.float()


def _load_dense_layer_(dense_layer, reference: str, prefix: str) -> None:
    """Overwrite ``dense_layer``'s linear weights with the reference checkpoint's (one layer read at a time)."""
    from safetensors import safe_open

    folder = Path(reference)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"dense_reference {folder} holds no .safetensors weights")
    index = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            index.update({k: f for k in st.keys()})
    for name, lin in prunable_linears(dense_layer).items():
        key = f"{prefix}.{name}.weight"
        if key not in index:
            raise KeyError(f"dense_reference {folder} has no tensor {key!r}; is it the same architecture?")
        with safe_open(str(index[key]), framework="pt") as st:
            tensor = st.get_tensor(key)
        if tensor.shape != lin.weight.shape:
            raise ValueError(f"dense_reference tensor {key} has shape {tuple(tensor.shape)}, the model {tuple(lin.weight.shape)}")
        lin.weight.data.copy_(tensor)


def _initialize_(layer, inputs: ActivationStore, kwargs, config: LLMBarberConfig, attention: str,
                 plans: dict | None = None):
    """Apply the initializer to ``layer``. When it pruned staged (each linear pruned before it ran) and
    ``verify`` with ``reconstruct`` will need them, the attention block's outputs recorded by the schedule are
    returned (a store of batches: the whole pruned attention block on the block's inputs, free); else None.
    ``attention``: the attention module's attribute name in the layer."""
    blocks: dict = {}  # child -> its recorded outputs (prune_staged)
    result = None
    if config.init == "magnitude":
        magnitude_prune_layer_(layer, config)
    elif config.init in ("wanda", "sparsegpt"):
        prune_layer_ = wanda_prune_layer_ if config.init == "wanda" else sparsegpt_prune_layer_
        result = prune_layer_(layer, inputs, kwargs, config, outputs=False, plans=plans, block_outputs=blocks)
    # "existing": the model's zeros are the initial mask
    kept = blocks.pop(attention, None) if isinstance(result, tuple) and config.verify and config.reconstruct else None
    for store in blocks.values():
        store.close()
    return kept


def _apply_masks_(linears, dense_linears, names, pruned, new_masks, config) -> int:
    """Dense values (or the kept SparseGPT values) under the new masks; returns the number of swaps."""
    swapped = 0
    for n, old, new in zip(names, pruned, new_masks):
        w = linears[n].weight
        values = dense_linears[n].weight.detach().to(w.dtype)
        if config.retain_reconstruction:  # weights kept before and after keep their (SparseGPT) values
            values = torch.where(~old & ~new, w, values)
        write_param(linears[n], "weight", values.masked_fill(new, 0))
        swapped += int((old & ~new).sum())
    return swapped


def _rebuild_block_(adapter, layer, dense_layer, name, block, inputs, kwargs, config, replays, init_ys):
    """Rebuild one block's masks; returns its report entry and its final outputs (a store, or None when
    unknown), or ``(None, None)`` when the block has no linears left."""
    linears = block_linears(layer, block)
    if not linears:  # the sublayer was dropped structurally
        return None, None
    dense_linears = dict(block_linears(dense_layer, blocks_of(adapter, dense_layer)[name]))
    names = list(linears)
    pruned = [linears[n].weight == 0 for n in names]
    initial = {n: linears[n].weight.detach().clone() for n in names} if config.verify else None
    hessians, out_linear, out_name = None, None, None
    if config.reconstruct:
        # score the mask itself, not the initializer's update: at a least-squares update the kept weights'
        # error gradient vanishes and every pruned weight would look better than every kept one
        for n, mask in zip(names, pruned):
            write_param(linears[n], "weight", dense_linears[n].weight.detach().masked_fill(mask, 0))
        out_name = out_linear_name(adapter, layer, name)  # its Hessian is taken after the others' update
        hessians = {n: lin for n, lin in linears.items() if n != out_name}
        out_linear = linears.get(out_name)
    with _replayed(replays):  # the blocks before this one run from their known outputs
        xs, ys, call_kwargs = capture_block_io(layer, inputs, kwargs, block, hessians, out_linear)
    device = execution_device(layer)
    forward = block_forward(adapter, dense_layer, name, call_kwargs)
    dense_ys = inputs.like() if config.verify else None
    grads = block_gradient_sq(forward, {n: dense_linears[n].weight for n in linears}, pairs(xs, ys, device),
                              dense_ys)
    scores = [barber_scores(dense_linears[n].weight.data, grads[n], config.metric) for n in names]
    new_masks = rebuild_masks(scores, pruned, config.threshold, config.granularity, config.nm, config.nm_rule)
    entry = {"swapped": _apply_masks_(linears, dense_linears, names, pruned, new_masks, config)}
    final = None
    if hessians is not None:
        final = _reconstruct_block_(adapter, layer, name, out_name, linears, dict(zip(names, new_masks)),
                                    hessians, xs, call_kwargs, dense_linears, config, block.get("direct", False))
    if config.verify:
        initial_ys = init_ys if name == "attention" and config.reconstruct else None
        verdict, final = verify_block_(adapter, layer, name, linears, initial, xs, ys, dense_ys, call_kwargs,
                                       config, final, initial_ys)
        entry.update(verdict)
    for store in (xs, ys, dense_ys):
        if store is not None and store is not final:
            store.close()
    return entry, final


def barber_layer_(adapter, layer, inputs, kwargs, config: LLMBarberConfig, dense_source=None,
                  plans: dict | None = None):
    """Initializer + mask rebuild of one decoder layer, in place (``inputs``: a store of batches ``[b, T, d]``).
    Returns swap counts per block, and the layer's outputs as well (``(report, outputs)``) when every block's
    final outputs are already known (the propagation then replays them). ``plans``: see ``prune_staged``."""
    dense_layer = _dense_copy(layer)  # the only dense copy held: one layer
    if dense_source is not None:
        dense_source(dense_layer)
    blocks = blocks_of(adapter, layer)
    init_ys = _initialize_(layer, inputs, kwargs, config, adapter.attn_name, plans)
    report, replays, finals = {}, {}, []
    try:
        for name, block in blocks.items():
            entry, final = _rebuild_block_(adapter, layer, dense_layer, name, block, inputs, kwargs, config,
                                           replays, init_ys)
            if entry is None:
                continue
            report[name] = entry
            if final is not None:
                finals.append(final)
                if block["attr"] is not None:  # a module that can be replayed
                    replays[(layer, block["attr"])] = (final, block.get("arity"))
        del dense_layer
        if not replays:
            return report
        with _replayed(replays):  # the propagation pass: only the glue runs
            return report, propagate(layer, inputs, kwargs)
    finally:
        for store in (*finals, init_ys):
            if store is not None:
                store.close()


@register_method("llm_barber", LLMBarberConfig)
def run_llm_barber(model, config: LLMBarberConfig, calibration) -> PruningResult:
    adapter = adapter_for(model)
    check_widths(model, config.nm)
    layers = adapter.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    plans: dict = {}  # the initializer's staged schedule: how a layer's forward reaches its linears

    def process(i, layer, inputs, kwargs):
        source = None
        if config.init == "existing":
            source = lambda dense, i=i: _load_dense_layer_(dense, config.dense_reference, f"{prefix}.{i}")  # noqa: E731
        return barber_layer_(adapter, layer, inputs, kwargs, config, source, plans)

    reports = sequential(model, calibration, process, f"llm_barber({config.init})")
    total = sum(b["swapped"] for r in reports for b in r.values())
    logger.info("llm_barber swapped %d weights", total)
    return PruningResult(report={"sparsity": sparsity_report(model), "swaps": reports, "swapped": total,
                                 "config": json.loads(json.dumps(config.to_dict()))})
