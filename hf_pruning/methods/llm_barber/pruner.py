"""Orchestration of LLM-Barber, layer by layer, holding the dense copy of ONE decoder layer at a time.

For each layer: keep a dense copy of the layer, apply the initializer to the live layer (sparse-path
inputs), then for the attention block and then the MLP block: capture the sparse block's inputs and outputs,
take gradients of the block error at the dense weights, score, swap mask entries per group, and write dense
values (or SparseGPT's) under the new mask. Finally the layer's outputs become the next layer's inputs.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ...calibration import hooks, run_layer
from ...registry import PruningResult, register_method
from ...remote.hf_pruning_surgery import adapter_for
from ..layerwise import check_widths, input_stat_hooks, prunable_linears, sequential, sparsity_report
from ..magnitude.pruner import magnitude_prune_layer_
from ..sparsegpt.pruner import add_to_hessian, new_hessian, sparsegpt_prune_layer_
from ..sparsegpt.scoring import sparsegpt_solve_
from ..sparsity import rebuild_masks
from ..wanda.pruner import wanda_prune_layer_
from .config import BarberConfig
from .scoring import barber_scores, block_error, block_gradient_sq

logger = logging.getLogger(__name__)


def _blocks(adapter, layer) -> dict[str, dict]:
    """Per block: the module whose input/output is captured, and a dense forward built from a layer copy."""
    attn = getattr(layer, adapter.attn_name)
    blocks = {"attention": {"prefix": adapter.attn_name + ".", "in": attn, "out": attn, "tuple_out": True,
                            "stop_after": True}}
    if adapter.mlp_name:
        mlp = getattr(layer, adapter.mlp_name)
        blocks["mlp"] = {"prefix": adapter.mlp_name + ".", "in": mlp, "out": mlp, "tuple_out": False,
                         "stop_after": False}
    else:  # OPT: fc1 -> activation -> fc2 on the layer itself
        blocks["mlp"] = {"prefix": None, "names": (*adapter.mlp_in_names, adapter.mlp_out_name),
                         "in": getattr(layer, adapter.mlp_in_names[0]), "out": getattr(layer, adapter.mlp_out_name),
                         "tuple_out": False, "stop_after": False}
    return blocks


def _block_linears(layer, block: dict) -> dict[str, nn.Linear]:
    linears = prunable_linears(layer)
    if block["prefix"] is not None:
        return {n: m for n, m in linears.items() if n.startswith(block["prefix"])}
    return {n: m for n, m in linears.items() if n in block["names"]}


def _dense_forward(adapter, dense_layer, name: str, kwargs: dict):
    """The block ``name`` of ``dense_layer`` (any layer: the live one too) as a function of its input."""
    if name == "attention":
        attn = getattr(dense_layer, adapter.attn_name)
        return lambda x: attn(hidden_states=x, **kwargs)[0]
    if adapter.mlp_name:
        return getattr(dense_layer, adapter.mlp_name)
    fc_in, fc_out = getattr(dense_layer, adapter.mlp_in_names[0]), getattr(dense_layer, adapter.mlp_out_name)
    return lambda x: fc_out(dense_layer.activation_fn(fc_in(x)))


class _BlockDone(Exception):
    """Ends a capture forward once the captured block has run (never escapes this module)."""


def _capture_block_io(layer, inputs, kwargs, block, hessians: dict | None = None) -> tuple[list, list, dict]:
    """Run the (sparse) layer over the input batches; return the block's inputs and outputs split per
    calibration row (``[1, T, d]`` each: the block error's gradient is taken row by row) and its call kwargs.
    With ``hessians`` (name -> linear), the same pass also returns each linear's input Hessian in its place."""
    xs, ys, call_kwargs = [], [], {}

    def pre(mod, args, kw):
        xs.extend((args[0] if args else kw["hidden_states"]).detach().split(1))
        if not call_kwargs:
            call_kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

    def post(mod, args, out):
        ys.extend((out[0] if block["tuple_out"] else out).detach().split(1))
        if block["stop_after"]:
            raise _BlockDone  # the rest of the layer is not needed for this block

    with hooks() as handles:
        handles.append(block["in"].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block["out"].register_forward_hook(post))
        stats = input_stat_hooks(handles, hessians or {}, new_hessian, add_to_hessian)
        for h in inputs:
            try:
                run_layer(layer, h, kwargs)
            except _BlockDone:
                pass
    if hessians is not None:
        hessians.update({name: st["h"] for name, st in stats.items()})
    return xs, ys, call_kwargs


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


def _initialize_(layer, inputs, kwargs, config: BarberConfig) -> None:
    if config.init == "magnitude":
        magnitude_prune_layer_(layer, config)
    elif config.init == "wanda":
        wanda_prune_layer_(layer, inputs, kwargs, config)
    elif config.init == "sparsegpt":
        sparsegpt_prune_layer_(layer, inputs, kwargs, config)
    # "existing": the model's zeros are the initial mask


def _out_linear_name(adapter, layer, name: str) -> str:
    """Full name (inside the layer) of the block's output projection: o_proj / out_proj, down_proj / fc2."""
    if name == "attention":
        attn = getattr(layer, adapter.attn_name)
        return f"{adapter.attn_name}.{getattr(attn, 'out_name', adapter.o_name)}"
    return f"{adapter.mlp_name}.{adapter.mlp_out_name}" if adapter.mlp_name else adapter.mlp_out_name


def _reconstruct_block_(adapter, layer, name, out_name, linears, masks, hessians, xs, call_kwargs, dense_linears,
                        config):
    """``reconstruct=True``: re-solve the block's kept weights for the new masks from the dense values.

    The linears that read the block input (q/k/v, gate/up, fc1) use the Hessians of the capture pass; the
    output projection's input changes with them, so its Hessian is taken afterwards by running the updated
    block over the captured inputs (SparseGPT's sequential order inside the block).
    """
    def solve(n, hessian):
        w = linears[n].weight.data
        w.copy_(dense_linears[n].weight.data)
        sparsegpt_solve_(w, hessian, config.sparsity, config.nm, config.blocksize, config.percdamp,
                         fixed_mask=masks[n])

    for n in hessians:
        solve(n, hessians[n])
    if out_name not in linears:
        return
    forward = _dense_forward(adapter, layer, name, call_kwargs)  # the live (sparse, updated) block
    with hooks() as handles:
        stats = input_stat_hooks(handles, {out_name: linears[out_name]}, new_hessian, add_to_hessian)
        for x in xs:
            forward(x)
    solve(out_name, stats[out_name]["h"])


def _load_weights_(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> None:
    for n, lin in linears.items():
        lin.weight.data.copy_(weights[n])


def _verify_block_(adapter, layer, name, linears, initial, xs, ys, dense_ys, call_kwargs, config) -> dict:
    """``verify=True``: compare the block's output error (against the dense block on the same sparse-path
    inputs) with the rebuilt weights and with the initializer's; restore the initializer's unless the rebuild
    is strictly better. Without ``reconstruct`` the captured outputs ``ys`` are the initializer's block."""
    live = _dense_forward(adapter, layer, name, call_kwargs)  # the live block with its current (rebuilt) weights
    rebuilt_error = block_error(live, xs, dense_ys)
    rebuilt = {n: lin.weight.data.clone() for n, lin in linears.items()}
    if config.reconstruct:  # the capture ran on dense values under the initial mask: run the initializer's
        _load_weights_(linears, initial)
        initial_error = block_error(live, xs, dense_ys)
    else:
        initial_error = block_error(lambda y: y, ys, dense_ys)
    keep = rebuilt_error < initial_error
    _load_weights_(linears, rebuilt if keep else initial)
    if not keep:
        logger.debug("llm_barber: %s block kept its initial mask (error %.3g <= rebuilt %.3g)", name,
                     initial_error, rebuilt_error)
    return {"initial_error": initial_error, "rebuilt_error": rebuilt_error, "kept_rebuild": bool(keep),
            **({} if keep else {"swapped": 0})}


def barber_layer_(adapter, layer, inputs, kwargs, config: BarberConfig, dense_source=None) -> dict:
    """Initializer + mask rebuild of one decoder layer, in place. Returns swap counts per block."""
    dense_layer = copy.deepcopy(layer).float()  # the only dense copy held: one layer
    if dense_source is not None:
        dense_source(dense_layer)
    _initialize_(layer, inputs, kwargs, config)
    report = {}
    for name, block in _blocks(adapter, layer).items():
        linears = _block_linears(layer, block)
        if not linears:  # the sublayer was dropped structurally
            continue
        dense_linears = dict(_block_linears(dense_layer, _blocks(adapter, dense_layer)[name]))
        names = list(linears)
        pruned = [linears[n].weight.data == 0 for n in names]
        initial = {n: linears[n].weight.data.clone() for n in names} if config.verify else None
        hessians = None
        if config.reconstruct:
            # score the mask itself, not the initializer's update: at a least-squares update the kept weights'
            # error gradient vanishes and every pruned weight would look better than every kept one
            for n, mask in zip(names, pruned):
                linears[n].weight.data.copy_(dense_linears[n].weight.data.masked_fill(mask, 0))
            out_name = _out_linear_name(adapter, layer, name)  # its Hessian is taken after the others' update
            hessians = {n: lin for n, lin in linears.items() if n != out_name}
        xs, ys, call_kwargs = _capture_block_io(layer, inputs, kwargs, block, hessians)
        forward = _dense_forward(adapter, dense_layer, name, call_kwargs)
        dense_ys = [] if config.verify else None
        grads = block_gradient_sq(forward, {n: dense_linears[n].weight for n in linears}, xs, ys, dense_ys)
        scores = [barber_scores(dense_linears[n].weight.data, grads[n], config.metric) for n in names]
        new_masks = rebuild_masks(scores, pruned, config.threshold, config.granularity, config.nm, config.nm_rule)
        swapped = 0
        for n, old, new in zip(names, pruned, new_masks):
            w = linears[n].weight.data
            values = dense_linears[n].weight.data.to(w.dtype)
            if config.retain_reconstruction:  # weights kept before and after keep their (SparseGPT) values
                values = torch.where(~old & ~new, w, values)
            w.copy_(values.masked_fill(new, 0))
            swapped += int((old & ~new).sum())
        if hessians is not None:
            _reconstruct_block_(adapter, layer, name, out_name, linears, dict(zip(names, new_masks)), hessians, xs,
                                call_kwargs, dense_linears, config)
        report[name] = {"swapped": swapped}
        if config.verify:
            report[name].update(_verify_block_(adapter, layer, name, linears, initial, xs, ys, dense_ys, call_kwargs,
                                               config))
        del xs, ys, grads, hessians, initial, dense_ys
    del dense_layer
    return report


@register_method("llm_barber", BarberConfig)
def run_llm_barber(model, config: BarberConfig, calibration) -> PruningResult:
    adapter = adapter_for(model)
    check_widths(model, config.nm)
    layers = adapter.decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)

    def process(i, layer, inputs, kwargs):
        source = None
        if config.init == "existing":
            source = lambda dense, i=i: _load_dense_layer_(dense, config.dense_reference, f"{prefix}.{i}")  # noqa: E731
        return barber_layer_(adapter, layer, inputs, kwargs, config, source)

    reports = sequential(model, calibration, process, f"llm_barber({config.init})")
    total = sum(b["swapped"] for r in reports for b in r.values())
    logger.info("llm_barber swapped %d weights", total)
    return PruningResult(report={"sparsity": sparsity_report(model), "swaps": reports, "swapped": total,
                                 "config": json.loads(json.dumps(config.to_dict()))})
