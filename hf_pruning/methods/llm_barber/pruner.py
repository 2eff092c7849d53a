"""Orchestration of LLM-Barber, layer by layer, holding the dense copy of ONE decoder layer at a time.

For each layer: keep a dense copy of the layer, apply the initializer to the live layer (sparse-path
inputs), then for the attention block and then the MLP block: capture the sparse block's inputs and outputs,
take gradients of the block error at the dense weights, score, swap mask entries per group, and write dense
values (or SparseGPT's) under the new mask. Finally the layer's outputs become the next layer's inputs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ...accounting import prunable_linears, sparsity_report
from ...calibration import hooks, run_layer
from ...registry import PruningResult, register_method
from ...remote.hf_pruning_surgery import adapter_for
from ..magnitude.pruner import magnitude_prune_layer_
from ..masks.layerwise import check_widths, input_stat_hooks, sequential
from ..masks.selection import rebuild_masks
from ..sparsegpt.pruner import add_to_hessian, new_hessian, sparsegpt_prune_layer_
from ..sparsegpt.scoring import inverse_hessian_factor, sparsegpt_solve_
from ..wanda.pruner import wanda_prune_layer_
from .config import LLMBarberConfig
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
                         "stop_after": True}
    else:  # OPT: fc1 -> activation -> fc2 on the layer itself
        blocks["mlp"] = {"prefix": None, "names": (*adapter.mlp_in_names, adapter.mlp_out_name),
                         "in": getattr(layer, adapter.mlp_in_names[0]), "out": getattr(layer, adapter.mlp_out_name),
                         "tuple_out": False, "stop_after": True}
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


#: SparseGPT's column block size for a fixed-mask re-solve: the result does not depend on it (only SparseGPT's
#: own mask choice does), and small blocks run fastest on CPU (SmolLM2's 576 x 1536 matrix: 0.10 s at 16,
#: 0.19 s at 128)
FIXED_MASK_BLOCKSIZE = 16


class _BlockDone(Exception):
    """Ends a capture forward once the captured block has run (never escapes this module)."""


def _capture_block_io(layer, inputs, kwargs, block, hessians: dict | None = None,
                      out_linear: nn.Module | None = None) -> tuple[list, list, dict]:
    """Run the (sparse) layer over the input batches; return the block's inputs and outputs split per
    calibration row (``[1, T, d]`` each: the block error's gradient is taken row by row) and its call kwargs.
    With ``hessians`` (name -> linear), the same pass also returns each linear's input Hessian in its place.
    With ``out_linear``, ``block["direct"]`` records whether the block's output is that linear's output."""
    xs, ys, call_kwargs, linear_out = [], [], {}, []

    def pre(mod, args, kw):
        xs.extend((args[0] if args else kw["hidden_states"]).detach().split(1))
        if not call_kwargs:
            call_kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})

    def post(mod, args, out):
        y = out[0] if block["tuple_out"] else out
        if block["tuple_out"]:
            block["arity"] = len(out)
        if "direct" not in block:
            block["direct"] = bool(linear_out) and torch.equal(linear_out[0], y)
        ys.extend(y.detach().split(1))
        if block["stop_after"]:
            raise _BlockDone  # the rest of the layer is not needed for this block

    with hooks() as handles:
        if out_linear is not None:  # registered first: on OPT's fc2 it is also the block's own output hook
            handles.append(out_linear.register_forward_hook(
                lambda mod, args, out: linear_out.append(out) if not linear_out else None))
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


def _initialize_(layer, inputs, kwargs, config: LLMBarberConfig, attention: dict) -> list | None:
    """Apply the initializer to ``layer``. When it pruned in flight (one pass over all rows, each linear
    pruned before it ran) and ``verify`` with ``reconstruct`` will need them, that pass's attention outputs
    (the initializer's attention block on the block's inputs) are returned per row ``[1, T, d]``; else None."""
    seen: list = []
    with hooks() as handles:
        if config.verify and config.reconstruct:
            handles.append(attention["out"].register_forward_hook(lambda mod, args, out: seen.append(out[0].detach())))
        result = None
        if config.init == "magnitude":
            magnitude_prune_layer_(layer, config)
        elif config.init == "wanda":
            result = wanda_prune_layer_(layer, inputs, kwargs, config)
        elif config.init == "sparsegpt":
            result = sparsegpt_prune_layer_(layer, inputs, kwargs, config)
        # "existing": the model's zeros are the initial mask
    if isinstance(result, tuple) and len(seen) == 1:  # (report, outputs): one pruned-in-flight pass
        return list(seen[0].split(1))
    return None


def _out_linear_name(adapter, layer, name: str) -> str:
    """Full name (inside the layer) of the block's output projection: o_proj / out_proj, down_proj / fc2."""
    if name == "attention":
        attn = getattr(layer, adapter.attn_name)
        return f"{adapter.attn_name}.{getattr(attn, 'out_name', adapter.o_name)}"
    return f"{adapter.mlp_name}.{adapter.mlp_out_name}" if adapter.mlp_name else adapter.mlp_out_name


def _reconstruct_block_(adapter, layer, name, out_name, linears, masks, hessians, xs, call_kwargs, dense_linears,
                        config, direct: bool = False):
    """``reconstruct=True``: re-solve the block's kept weights for the new masks from the dense values.

    The linears that read the block input (q/k/v, gate/up, fc1) use the Hessians of the capture pass (linears
    sharing an input share its factorisation); the output projection's input changes with them, so its
    Hessian is taken afterwards by running the updated block over the captured inputs (SparseGPT's sequential
    order inside the block); that pass stops at the output projection. Returns the rebuilt block's outputs
    per row when they come for free: when the block's output is its output projection's (``block["direct"]``,
    seen in the capture pass), they are the re-solved projection applied to the inputs just captured;
    otherwise None. With a fixed mask SparseGPT's block size only splits the work (the result is the same):
    small blocks are fastest on CPU.
    """
    factors: dict[int, torch.Tensor] = {}

    def solve(n, hessian):
        w = linears[n].weight.data
        w.copy_(dense_linears[n].weight.data)
        if id(hessian) not in factors:
            factors.clear()
            factors[id(hessian)] = inverse_hessian_factor(hessian, config.percdamp)
        sparsegpt_solve_(w, hessian, config.sparsity, config.nm, FIXED_MASK_BLOCKSIZE, config.percdamp,
                         fixed_mask=masks[n], factor=factors[id(hessian)])

    for n in hessians:
        solve(n, hessians[n])
    if out_name not in linears:
        return None
    out_linear = linears[out_name]
    forward = _dense_forward(adapter, layer, name, call_kwargs)  # the live (sparse, updated) block
    zs, stat = [], new_hessian(out_linear)

    def stop_at_projection(mod, args):
        zs.append(args[0].detach())
        add_to_hessian(stat, zs[-1].reshape(-1, zs[-1].shape[-1]).float())
        raise _BlockDone

    with hooks() as handles:
        handles.append(out_linear.register_forward_pre_hook(stop_at_projection))
        for x in xs:
            try:
                forward(x)
            except _BlockDone:
                pass
    if len(zs) != len(xs):
        raise RuntimeError(f"llm_barber: the {name} block's forward did not reach {out_name} once per row")
    solve(out_name, stat["h"])
    return [out_linear(z) for z in zs] if direct else None


def _load_weights_(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor]) -> None:
    for n, lin in linears.items():
        lin.weight.data.copy_(weights[n])


def _outputs(forward, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [forward(x).detach() for x in xs]


def _verify_block_(adapter, layer, name, linears, initial, xs, ys, dense_ys, call_kwargs, config,
                   rebuilt_ys=None, initial_ys=None) -> tuple[dict, list]:
    """``verify=True``: compare the block's output error (against the dense block on the same sparse-path
    inputs) with the rebuilt weights and with the initializer's; restore the initializer's unless the rebuild
    is strictly better. Without ``reconstruct`` the captured outputs ``ys`` are the initializer's block.
    ``rebuilt_ys`` / ``initial_ys``: either block's outputs per row when the caller already has them (else a
    forward makes them). Returns the report and the outputs of the block as it stays."""
    live = _dense_forward(adapter, layer, name, call_kwargs)  # the live block with its current (rebuilt) weights
    if rebuilt_ys is None:
        rebuilt_ys = _outputs(live, xs)
    rebuilt_error = block_error(lambda y: y, rebuilt_ys, dense_ys)
    rebuilt = None  # set when the initializer's weights had to be loaded to run its block
    if initial_ys is None and config.reconstruct:  # the capture ran on dense values under the initial mask
        rebuilt = {n: lin.weight.data.clone() for n, lin in linears.items()}
        _load_weights_(linears, initial)
        initial_ys = _outputs(live, xs)
    elif initial_ys is None:
        initial_ys = ys
    initial_error = block_error(lambda y: y, initial_ys, dense_ys)
    keep = rebuilt_error < initial_error
    if keep and rebuilt is not None:
        _load_weights_(linears, rebuilt)
    elif not keep and rebuilt is None:
        _load_weights_(linears, initial)
    if not keep:
        logger.debug("llm_barber: %s block kept its initial mask (error %.3g <= rebuilt %.3g)", name,
                     initial_error, rebuilt_error)
    report = {"initial_error": initial_error, "rebuilt_error": rebuilt_error, "kept_rebuild": bool(keep),
              **({} if keep else {"swapped": 0})}
    return report, (rebuilt_ys if keep else initial_ys)


@contextlib.contextmanager
def _replayed(replays: dict):
    """Inside the context, each module of ``replays`` (module -> its outputs for the successive layer calls,
    computed before) returns its next output instead of running: a layer pass whose blocks' outputs are
    already known costs only the glue around them (norms, residual adds)."""
    def replay(outputs):
        it = iter(outputs)
        return lambda *args, **kwargs: next(it)

    patched = [m for m in replays if "forward" not in vars(m)]
    for module in patched:
        module.forward = replay(replays[module])
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _batches(rows: list[torch.Tensor], inputs: list[torch.Tensor], arity: int | None) -> list:
    """Per-row block outputs ``[1, T, d]`` regrouped like the layer's input batches; as ``(y, None, ...)``
    tuples of ``arity`` when the block returns a tuple (attention)."""
    out, start = [], 0
    for h in inputs:
        y = torch.cat(rows[start : start + h.shape[0]])
        start += h.shape[0]
        out.append(y if arity is None else (y, *([None] * (arity - 1))))
    return out


def barber_layer_(adapter, layer, inputs, kwargs, config: LLMBarberConfig, dense_source=None):
    """Initializer + mask rebuild of one decoder layer, in place. Returns swap counts per block, and the
    layer's outputs as well (``(report, outputs)``) when every block's final outputs are already known."""
    dense_layer = copy.deepcopy(layer).float()  # the only dense copy held: one layer
    if dense_source is not None:
        dense_source(dense_layer)
    blocks = _blocks(adapter, layer)
    init_attention_ys = _initialize_(layer, inputs, kwargs, config, blocks["attention"])
    report, final, replays = {}, {}, {}
    for name, block in blocks.items():
        linears = _block_linears(layer, block)
        if not linears:  # the sublayer was dropped structurally
            continue
        dense_linears = dict(_block_linears(dense_layer, _blocks(adapter, dense_layer)[name]))
        names = list(linears)
        pruned = [linears[n].weight.data == 0 for n in names]
        initial = {n: linears[n].weight.data.clone() for n in names} if config.verify else None
        hessians, out_linear = None, None
        if config.reconstruct:
            # score the mask itself, not the initializer's update: at a least-squares update the kept weights'
            # error gradient vanishes and every pruned weight would look better than every kept one
            for n, mask in zip(names, pruned):
                linears[n].weight.data.copy_(dense_linears[n].weight.data.masked_fill(mask, 0))
            out_name = _out_linear_name(adapter, layer, name)  # its Hessian is taken after the others' update
            hessians = {n: lin for n, lin in linears.items() if n != out_name}
            out_linear = linears.get(out_name)
        with _replayed(replays):  # the blocks before this one run from their known outputs
            xs, ys, call_kwargs = _capture_block_io(layer, inputs, kwargs, block, hessians, out_linear)
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
        rebuilt_ys = None
        if hessians is not None:
            rebuilt_ys = _reconstruct_block_(adapter, layer, name, out_name, linears, dict(zip(names, new_masks)),
                                             hessians, xs, call_kwargs, dense_linears, config,
                                             block.get("direct", False))
        report[name] = {"swapped": swapped}
        final[name] = rebuilt_ys
        if config.verify:
            initial_ys = init_attention_ys if name == "attention" and config.reconstruct else None
            verdict, final[name] = _verify_block_(adapter, layer, name, linears, initial, xs, ys, dense_ys,
                                                  call_kwargs, config, rebuilt_ys, initial_ys)
            report[name].update(verdict)
        if final[name] is not None and block["in"] is block["out"]:  # a module that can be replayed
            replays[block["in"]] = _batches(final[name], inputs, block.get("arity"))
        del xs, ys, grads, hessians, initial, dense_ys, rebuilt_ys
    del dense_layer
    if not replays:
        return report
    with _replayed(replays):  # the propagation pass: only the glue runs
        outputs = [run_layer(layer, h, kwargs) for h in inputs]
    return report, outputs


@register_method("llm_barber", LLMBarberConfig)
def run_llm_barber(model, config: LLMBarberConfig, calibration) -> PruningResult:
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
