"""Checks of the model object itself, run before anything changes: is it a supported causal LM with float
weights in memory? Each refusal names the way out (:class:`UnsupportedModelError`, :class:`QuantizedModelError`).
"""

from __future__ import annotations

import itertools
import sys

from torch import nn

from .engine import offload_hook
from .remote.hf_pruning_surgery import adapter_for
from .remote.modeling_hf_pruning import PRUNED_MODEL_CLASSES, PrunedCausalLMMixin


class QuantizedModelError(ValueError):
    """Pruning needs float weights; the model still carries a quantizer."""


def _check_float_model(model: nn.Module) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    qconfig = getattr(model.config, "quantization_config", None)
    if quantizer is not None or qconfig is not None:
        kind = getattr(qconfig, "quant_method", None) or (qconfig.get("quant_method") if isinstance(qconfig, dict) else None)
        hint = (
            "load it with hf_pruning.from_pretrained(path, gguf_file=...), which dequantizes GGUF weights and "
            "clears the quantizer, or call hf_pruning.clear_quantizer_(model) if its weights are already floats"
        )
        raise QuantizedModelError(f"the model is quantized ({kind or type(quantizer).__name__}); {hint}")


def clear_quantizer_(model: nn.Module) -> nn.Module:
    """Forget the quantizer of a model whose weights were dequantized on load (GGUF) so it can be pruned and saved."""
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if bad:
        raise QuantizedModelError(f"parameters {bad[:3]} are not floating point; this model is really quantized")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property on some versions
            pass
    return model


class UnsupportedModelError(ValueError):
    """A model object that cannot be pruned as it is given (the message says how to get one that can).

    Raised before anything changes for: a ``torch.compile`` wrapper, a PEFT model or a model with adapter layers,
    a model class other than a supported ``*ForCausalLM`` (sequence classification, the bare base model), and weights
    on the ``meta`` device (weights offloaded by accelerate, to the CPU or to disk, are accepted).
    """


_LOAD_HINT = "hf_pruning.from_pretrained(path) or transformers.AutoModelForCausalLM.from_pretrained(path)"


def _causal_lm_class(arch: str) -> type:
    """The stock ``<Arch>ForCausalLM`` class of an architecture (the base of our ``Pruned<Arch>ForCausalLM``)."""
    pruned = PRUNED_MODEL_CLASSES[arch]
    return next(b for b in pruned.__bases__ if b is not PrunedCausalLMMixin)


def _peft_kind(model: nn.Module) -> str | None:
    """What PEFT left on ``model`` (a wrapper or injected adapter layers), or None. peft is never imported here:
    a model cannot carry PEFT modules unless peft was imported."""
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    wrapper = getattr(peft, "PeftModel", None)
    if wrapper is not None and isinstance(model, wrapper):
        return f"a PEFT model ({type(model).__name__})"
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - a peft without the tuner base class
        return None
    layers = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if layers:
        return f"a model with {len(layers)} PEFT adapter layer(s) (e.g. {layers[0]})"
    return None


def _meta_tensor(model: nn.Module) -> str | None:
    """The first parameter or buffer on ``meta`` that no accelerate offload hook holds a copy of, or None."""
    for module_name, module in model.named_modules():
        if offload_hook(module) is not None:
            continue
        for name, t in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if t.is_meta:
                return f"{module_name}.{name}" if module_name else name
    return None


def check_model(model: nn.Module, offload_ok: bool = True):
    """Refuse, before anything changes, a model that hf_pruning cannot prune in place; returns its adapter.

    Accepted: a supported architecture's ``*ForCausalLM`` (or our ``Pruned*ForCausalLM``) with float weights
    in memory or offloaded by accelerate. Refused with :class:`UnsupportedModelError` saying the way out: a ``torch.compile`` wrapper
    (prune ``model._orig_mod``, or prune before compiling), a PEFT model (``merge_and_unload()`` first), another
    head or the bare base model (load ``AutoModelForCausalLM``), weights on ``meta`` (not offloaded).
    ``offload_ok=False`` also refuses offloaded weights
    (recovery fine-tuning). An unknown architecture raises ``UnsupportedArchitectureError``, a quantized model ``QuantizedModelError``.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a transformers causal LM (an nn.Module), got {type(model).__name__}; "
                                    f"load one with {_LOAD_HINT}")
    if isinstance(model._modules.get("_orig_mod"), nn.Module):
        raise UnsupportedModelError(
            f"the model is a torch.compile wrapper ({type(model).__name__}); pruning changes the modules under the "
            "compiled graph, so prune the original model, model._orig_mod (or prune before compiling), then "
            "compile the pruned model again"
        )
    peft = _peft_kind(model)
    if peft is not None:
        raise UnsupportedModelError(
            f"the model is {peft}; pruning under an active adapter would drop or misplace the adapter's weights. "
            "Merge it first: model = model.merge_and_unload(), prune, and attach new adapters afterwards "
            "(hf_pruning.lora_target_modules(model) names the linears a pruned model still has)"
        )
    if getattr(model, "config", None) is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no transformers config; load the model with {_LOAD_HINT}")
    adapter = adapter_for(model)  # an unsupported architecture raises its own error, listing the supported ones
    expected = _causal_lm_class(adapter.arch)
    # any supported causal-LM class passes: the same weights load into a sibling class (e.g. a LLaMA checkpoint
    # into MistralForCausalLM), and the config, which the saved code replays from, picks the adapter
    if not isinstance(model, tuple(_causal_lm_class(arch) for arch in PRUNED_MODEL_CLASSES)):
        kind = "the bare decoder without its language-model head" if type(model).__name__.endswith("Model") else \
            "not a causal language model"
        raise UnsupportedModelError(
            f"{type(model).__name__} is {kind}; hf_pruning prunes causal LMs ({expected.__name__}). Load the "
            f"checkpoint with {_LOAD_HINT}"
        )
    offloaded = [name or "(whole model)" for name, m in model.named_modules() if offload_hook(m) is not None]
    if offloaded and not offload_ok:
        raise UnsupportedModelError(
            f"the model's weights are offloaded by accelerate ({len(offloaded)} module(s), e.g. {offloaded[0]}); "
            "recovery fine-tuning trains every layer at once and needs the weights on devices that hold all of it. "
            "Save the pruned model and reload it without offloading (no 'disk' in device_map, no offload_folder) "
            "to fine-tune it"
        )
    meta = _meta_tensor(model)  # an offloaded weight is on meta too, with its copy in the hook's weights_map
    if meta is not None:
        raise UnsupportedModelError(
            f"the model has no weights: {meta} is on the meta device (built under torch.device('meta') or "
            f"init_empty_weights()); load real weights first with {_LOAD_HINT}"
        )
    _check_float_model(model)
    return adapter
