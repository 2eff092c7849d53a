"""LLM-Barber's blocks (attention, MLP) inside one decoder layer, batch by batch on the engine.

A block's inputs and outputs are captured into :class:`~hf_pruning.engine.ActivationStore`\\ s (one batch on
the device at a time), blocks whose outputs are already known are replayed by stand-in modules put in the
layer for the duration (``masks/replay.py``, never by assigning ``forward``), and every weight edit goes through ``write_param``.
Under a process group the Hessians of ``reconstruct`` are summed over the ranks (SparseGPT's statistic) and the
fixed-mask solves are split by output row (:func:`~hf_pruning.engine.distributed.split_rows_`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...accounting import prunable_linears
from ...engine import ActivationStore, StopForward, distributed, execution_device, hooks, run_layer, write_param
from ..masks.layerwise import input_stat_hooks
from ..sparsegpt.pruner import hessian_factor, hessian_of, hessian_statistic
from ..sparsegpt.scoring import sparsegpt_solve_
from .scoring import block_error

logger = logging.getLogger(__name__)

#: SparseGPT's column block size for a fixed-mask re-solve: the result does not depend on it (only SparseGPT's
#: own mask choice does), and small blocks run fastest on CPU (SmolLM2's 576 x 1536 matrix: 0.10 s at 16,
#: 0.19 s at 128)
FIXED_MASK_BLOCKSIZE = 16


def blocks_of(adapter, layer) -> dict[str, dict]:
    """Per block: the module whose input/output is captured (``in``/``out``) and, for a block that is one
    module of the layer, its attribute name there (``attr``: the block can be replayed by a stand-in)."""
    attn = getattr(layer, adapter.attn_name)
    blocks = {"attention": {"prefix": adapter.attn_name + ".", "in": attn, "out": attn, "tuple_out": True,
                            "attr": adapter.attn_name}}
    if adapter.mlp_name:
        mlp = getattr(layer, adapter.mlp_name)
        blocks["mlp"] = {"prefix": adapter.mlp_name + ".", "in": mlp, "out": mlp, "tuple_out": False,
                         "attr": adapter.mlp_name}
    else:  # OPT: fc1 -> activation -> fc2 on the layer itself
        blocks["mlp"] = {"prefix": None, "names": (*adapter.mlp_in_names, adapter.mlp_out_name),
                         "in": getattr(layer, adapter.mlp_in_names[0]), "out": getattr(layer, adapter.mlp_out_name),
                         "tuple_out": False, "attr": None}
    return blocks


def block_linears(layer, block: dict) -> dict[str, nn.Linear]:
    linears = prunable_linears(layer)
    if block["prefix"] is not None:
        return {n: m for n, m in linears.items() if n.startswith(block["prefix"])}
    return {n: m for n, m in linears.items() if n in block["names"]}


def block_forward(adapter, dense_layer, name: str, kwargs: dict):
    """The block ``name`` of ``dense_layer`` (any layer: the live one too) as a function of its input."""
    if name == "attention":
        attn = getattr(dense_layer, adapter.attn_name)
        return lambda x: attn(hidden_states=x, **kwargs)[0]
    if adapter.mlp_name:
        return getattr(dense_layer, adapter.mlp_name)
    fc_in, fc_out = getattr(dense_layer, adapter.mlp_in_names[0]), getattr(dense_layer, adapter.mlp_out_name)
    return lambda x: fc_out(dense_layer.activation_fn(fc_in(x)))


def out_linear_name(adapter, layer, name: str) -> str:
    """Full name (inside the layer) of the block's output projection: o_proj / out_proj, down_proj / fc2."""
    if name == "attention":
        attn = getattr(layer, adapter.attn_name)
        return f"{adapter.attn_name}.{getattr(attn, 'out_name', adapter.o_name)}"
    return f"{adapter.mlp_name}.{adapter.mlp_out_name}" if adapter.mlp_name else adapter.mlp_out_name


def pairs(a: ActivationStore, b: ActivationStore, device):
    """Batch ``i`` of ``a`` and of ``b`` on ``device``, one pair at a time."""
    for i in range(len(a)):
        yield a.get(i, device), b.get(i, device)


@torch.no_grad()
def outputs_of(forward, xs: ActivationStore, device) -> ActivationStore:
    """``forward`` on every batch of ``xs`` (a store like ``xs``)."""
    out = xs.like()
    for i in range(len(xs)):
        out.append(forward(xs.get(i, device)))
    return out


@torch.no_grad()
def capture_block_io(layer, inputs: ActivationStore, kwargs: dict, block: dict, hessians: dict | None = None,
                     out_linear: nn.Module | None = None) -> tuple[ActivationStore, ActivationStore, dict]:
    """Run the (sparse) layer over the input batches until the block has run; return the block's inputs and
    outputs (stores of batches ``[b, T, d]`` like ``inputs``) and its call kwargs. With ``hessians`` (name ->
    linear), the same pass also returns each linear's input Hessian in its place. With ``out_linear``,
    ``block["direct"]`` records whether the block's output is that linear's output."""
    xs, ys, call_kwargs, linear_out = inputs.like(), inputs.like(), {}, []

    def pre(mod, args, kw):
        xs.append(args[0] if args else kw["hidden_states"])
        if not call_kwargs:
            call_kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

    def post(mod, args, out):
        y = out[0] if block["tuple_out"] else out
        if block["tuple_out"]:
            block["arity"] = len(out)
        if "direct" not in block:
            block["direct"] = bool(linear_out) and torch.equal(linear_out[0], y)
        ys.append(y)
        raise StopForward  # the rest of the layer is not needed for this block

    device = execution_device(layer)
    with hooks() as handles:
        if out_linear is not None:  # registered first: on OPT's fc2 it is also the block's own output hook
            handles.append(out_linear.register_forward_hook(
                lambda mod, args, out: linear_out.append(out) if not linear_out else None))
        handles.append(block["in"].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block["out"].register_forward_hook(post))
        stats = input_stat_hooks(handles, hessians or {}, *hessian_statistic())
        for i in range(len(inputs)):
            try:
                run_layer(layer, inputs.get(i, device), kwargs)
            except StopForward:
                pass
    found: dict = {}  # linears that read one input share one statistic: one Hessian (reduced once)
    for name, st in stats.items():
        if id(st) not in found:
            found[id(st)] = hessian_of(st)  # [in, in] float32
        hessians[name] = found[id(st)]
    return xs, ys, call_kwargs


def reconstruct_block_(adapter, layer, name, out_name, linears, masks, hessians, xs, call_kwargs, dense_linears,
                       config, direct: bool = False) -> ActivationStore | None:
    """``reconstruct=True``: re-solve the block's kept weights for the new masks from the dense values.

    The linears that read the block input (q/k/v, gate/up, fc1) use the Hessians of the capture pass (linears
    sharing an input share its factorisation); the output projection's input changes with them, so its
    Hessian is taken afterwards by running the updated block over the captured inputs batch by batch
    (SparseGPT's sequential order inside the block); that pass stops at the output projection. Returns the
    rebuilt block's outputs (a store of batches) when they come for free: when the block's output is its
    output projection's (``block["direct"]``, seen in the capture pass), they are the re-solved projection
    applied to the inputs just captured; otherwise None. With a fixed mask SparseGPT's block size only splits
    the work (the result is the same): small blocks are fastest on CPU.
    """
    factors: dict[int, torch.Tensor] = {}

    def solved_rows(n, hessian, rows):  # rows of the re-solved weight: with a fixed mask rows never mix
        if id(hessian) not in factors:
            factors.clear()
            factors[id(hessian)] = hessian_factor(hessian, config.percdamp)
        w = dense_linears[n].weight[rows].detach().to(linears[n].weight.dtype, copy=True)  # [r, in]
        sparsegpt_solve_(w, hessian.to(w.device), config.sparsity, config.nm, FIXED_MASK_BLOCKSIZE, config.percdamp,
                         fixed_mask=masks[n][rows], factor=factors[id(hessian)])
        return w

    # each rank re-solves its share of every linear's rows (all of them without a process group)
    distributed.split_rows_({n: linears[n] for n in hessians}, lambda n, lin, rows: solved_rows(n, hessians[n], rows))
    if out_name not in linears:
        return None
    out_linear = linears[out_name]
    forward = block_forward(adapter, layer, name, call_kwargs)  # the live (sparse, updated) block
    new_stat, add_to_stat = hessian_statistic()
    zs, stat = xs.like(), new_stat(out_linear)  # zs: the projection's inputs [b, T, in]

    def stop_at_projection(mod, args):
        zs.append(args[0])
        add_to_stat(stat, args[0].detach().reshape(-1, args[0].shape[-1]).float())
        raise StopForward

    device = execution_device(layer)
    with hooks() as handles, torch.no_grad():
        handles.append(out_linear.register_forward_pre_hook(stop_at_projection))
        for i in range(len(xs)):
            try:
                forward(xs.get(i, device))
            except StopForward:
                pass
    if len(zs) != len(xs):
        zs.close()
        raise RuntimeError(f"llm_barber: the {name} block's forward did not reach {out_name} once per batch")
    hessian = hessian_of(stat)  # [in, in] float32, every rank's rows
    distributed.split_rows_({out_name: out_linear}, lambda n, lin, rows: solved_rows(n, hessian, rows))
    rebuilt = outputs_of(out_linear, zs, device) if direct else None
    zs.close()
    return rebuilt


def load_weights_(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> None:
    for n, lin in linears.items():
        write_param(lin, "weight", weights[n])


def verify_block_(adapter, layer, name, linears, initial, xs, ys, dense_ys, call_kwargs, config,
                  rebuilt_ys=None, initial_ys=None) -> tuple[dict, ActivationStore]:
    """``verify=True``: compare the block's output error (against the dense block on the same sparse-path
    inputs) with the rebuilt weights and with the initializer's; restore the initializer's unless the rebuild
    is strictly better. Without ``reconstruct`` the captured outputs ``ys`` are the initializer's block.
    ``rebuilt_ys`` / ``initial_ys``: either block's outputs (stores of batches) when the caller already has
    them (else a forward makes them). Returns the report and the outputs of the block as it stays (the other
    store made here is closed)."""
    live = block_forward(adapter, layer, name, call_kwargs)  # the live block with its current (rebuilt) weights
    device = execution_device(layer)
    if rebuilt_ys is None:
        rebuilt_ys = outputs_of(live, xs, device)
    rebuilt_error = block_error(pairs(rebuilt_ys, dense_ys, device))
    rebuilt = None  # set when the initializer's weights had to be loaded to run its block
    if initial_ys is None and config.reconstruct:  # the capture ran on dense values under the initial mask
        rebuilt = {n: lin.weight.detach().clone() for n, lin in linears.items()}
        load_weights_(linears, initial)
        initial_ys = outputs_of(live, xs, device)
    elif initial_ys is None:
        initial_ys = ys
    initial_error = block_error(pairs(initial_ys, dense_ys, device))
    keep = rebuilt_error < initial_error
    if keep and rebuilt is not None:
        load_weights_(linears, rebuilt)
    elif not keep and rebuilt is None:
        load_weights_(linears, initial)
    if not keep:
        logger.debug("llm_barber: %s block kept its initial mask (error %.3g <= rebuilt %.3g)", name,
                     initial_error, rebuilt_error)
    report = {"initial_error": initial_error, "rebuilt_error": rebuilt_error, "kept_rebuild": bool(keep),
              **({} if keep else {"swapped": 0})}
    kept, dropped = (rebuilt_ys, initial_ys) if keep else (initial_ys, rebuilt_ys)
    if dropped is not ys:
        dropped.close()
    return report, kept
