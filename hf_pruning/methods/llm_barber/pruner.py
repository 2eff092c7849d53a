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
from ..layerwise import check_widths, prunable_linears, sequential, sparsity_report
from ..magnitude.pruner import magnitude_prune_layer_
from ..sparsegpt.pruner import sparsegpt_prune_layer_
from ..sparsity import rebuild_masks
from ..wanda.pruner import wanda_prune_layer_
from .config import BarberConfig
from .scoring import barber_scores, block_gradient_sq

logger = logging.getLogger(__name__)


def _blocks(adapter, layer) -> dict[str, dict]:
    """Per block: the module whose input/output is captured, and a dense forward built from a layer copy."""
    attn = getattr(layer, adapter.attn_name)
    blocks = {"attention": {"prefix": adapter.attn_name + ".", "in": attn, "out": attn, "tuple_out": True}}
    if adapter.mlp_name:
        mlp = getattr(layer, adapter.mlp_name)
        blocks["mlp"] = {"prefix": adapter.mlp_name + ".", "in": mlp, "out": mlp, "tuple_out": False}
    else:  # OPT: fc1 -> activation -> fc2 on the layer itself
        blocks["mlp"] = {"prefix": None, "names": (*adapter.mlp_in_names, adapter.mlp_out_name),
                         "in": getattr(layer, adapter.mlp_in_names[0]), "out": getattr(layer, adapter.mlp_out_name),
                         "tuple_out": False}
    return blocks


def _block_linears(layer, block: dict) -> dict[str, nn.Linear]:
    linears = prunable_linears(layer)
    if block["prefix"] is not None:
        return {n: m for n, m in linears.items() if n.startswith(block["prefix"])}
    return {n: m for n, m in linears.items() if n in block["names"]}


def _dense_forward(adapter, dense_layer, name: str, kwargs: dict):
    if name == "attention":
        attn = getattr(dense_layer, adapter.attn_name)
        return lambda x: attn(hidden_states=x, **kwargs)[0]
    if adapter.mlp_name:
        return getattr(dense_layer, adapter.mlp_name)
    fc_in, fc_out = getattr(dense_layer, adapter.mlp_in_names[0]), getattr(dense_layer, adapter.mlp_out_name)
    return lambda x: fc_out(dense_layer.activation_fn(fc_in(x)))


def _capture_block_io(layer, inputs, kwargs, block) -> tuple[list, list, dict]:
    """Run the (sparse) layer over the input batches; return the block's inputs and outputs split per
    calibration row (``[1, T, d]`` each: the block error's gradient is taken row by row) and its call kwargs."""
    xs, ys, call_kwargs = [], [], {}

    def pre(mod, args, kw):
        xs.extend((args[0] if args else kw["hidden_states"]).detach().split(1))
        if not call_kwargs:
            call_kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

    def post(mod, args, out):
        ys.extend((out[0] if block["tuple_out"] else out).detach().split(1))

    with hooks() as handles:
        handles.append(block["in"].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block["out"].register_forward_hook(post))
        for h in inputs:
            run_layer(layer, h, kwargs)
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
        xs, ys, call_kwargs = _capture_block_io(layer, inputs, kwargs, block)
        forward = _dense_forward(adapter, dense_layer, name, call_kwargs)
        grads = block_gradient_sq(forward, {n: dense_linears[n].weight for n in linears}, xs, ys)
        names = list(linears)
        pruned = [linears[n].weight.data == 0 for n in names]
        scores = [barber_scores(dense_linears[n].weight.data, grads[n], config.metric) for n in names]
        new_masks = rebuild_masks(scores, pruned, config.threshold, config.granularity, config.nm)
        swapped = 0
        for n, old, new in zip(names, pruned, new_masks):
            w = linears[n].weight.data
            values = dense_linears[n].weight.data.to(w.dtype)
            if config.retain_reconstruction:  # weights kept before and after keep their (SparseGPT) values
                values = torch.where(~old & ~new, w, values)
            w.copy_(values.masked_fill(new, 0))
            swapped += int((old & ~new).sum())
        report[name] = {"swapped": swapped}
        del xs, ys, grads
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
