"""The functional core: ``prune_``, ``apply_plan_``, ``get_plan``, ``from_pretrained``, ``save_pretrained``."""

from __future__ import annotations

import itertools
import json
import logging
import os
import reprlib
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .calibration.check import BUILD_HINT, CalibrationError, check_calibration
from .config import ConfigError, PruningConfig
from .plan import PlanError, PruningPlan
from .registry import PruningResult, get_method, list_methods
from .remote.configuration_hf_pruning import PRUNED_CONFIG_CLASSES
from .remote.hf_pruning_plan import TOO_DEEP
from .remote.hf_pruning_surgery import (
    adapter_for,
    base_fields,
    execute_ops_,
    inspect_model,
    simulate_plan,
)
from .remote.modeling_hf_pruning import PRUNED_MODEL_CLASSES, PrunedCausalLMMixin
from .saving import EVALUATION_NAME

logger = logging.getLogger(__name__)



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
    a model class other than a supported ``*ForCausalLM`` (sequence classification, the bare base model), weights
    on the ``meta`` device, and weights offloaded by accelerate (CPU/disk offload, not supported yet).
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


def _offloaded(model: nn.Module) -> list[str]:
    """Modules whose weights accelerate offloads (to the CPU or to disk) and loads only for their forward."""
    device_map = getattr(model, "hf_device_map", None) or {}
    names = [f"{name or '(whole model)'} (disk)" for name, where in device_map.items() if where == "disk"]
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook or one
            if getattr(h, "offload", False) or getattr(h, "weights_map", None) is not None:
                names.append(name or "(whole model)")
                break
    return names


def check_model(model: nn.Module):
    """Refuse, before anything changes, a model that hf_pruning cannot prune in place; returns its adapter.

    Accepted: a supported architecture's ``*ForCausalLM`` (or our ``Pruned*ForCausalLM``) with float weights
    in memory. Refused with :class:`UnsupportedModelError` saying the way out: a ``torch.compile`` wrapper
    (prune ``model._orig_mod``, or prune before compiling), a PEFT model (``merge_and_unload()`` first), another
    head or the bare base model (load ``AutoModelForCausalLM``), weights on ``meta`` or offloaded by accelerate.
    An unknown architecture raises ``UnsupportedArchitectureError``, a quantized model ``QuantizedModelError``.
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
    offloaded = _offloaded(model)
    if offloaded:
        raise UnsupportedModelError(
            f"the model's weights are offloaded by accelerate ({len(offloaded)} module(s), e.g. {offloaded[0]}); "
            "pruning offloaded models is not supported yet. Load it without offloading, on devices that hold all of "
            "it: no 'disk' in device_map, no offload_folder, no CPU offload next to a GPU (e.g. device_map='cpu', "
            "or device_map='cuda' on a GPU large enough)"
        )
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    meta = next((name for name, t in tensors if t.is_meta), None)
    if meta is not None:
        raise UnsupportedModelError(
            f"the model has no weights: {meta} is on the meta device (built under torch.device('meta') or "
            f"init_empty_weights()); load real weights first with {_LOAD_HINT}"
        )
    _check_float_model(model)
    return adapter


def _as_config(config) -> PruningConfig:
    """The method config ``prune_`` was given; a dict with a ``method`` key is parsed (the JSON form that
    ``config.json``'s ``pruning_config`` records); anything else that is not a config raises ConfigError."""
    names = list_methods()
    classes = ", ".join(f"hf_pruning.{get_method(n).config_class.__name__}" for n in names)
    if isinstance(config, dict):
        if "method" not in config:
            raise ConfigError(f"a dict config needs a 'method' key (one of {', '.join(names)}), got keys "
                              f"{sorted(map(str, config))}; or pass a config object: {classes}")
        try:
            return PruningConfig.from_dict(config)
        except KeyError as err:
            raise ConfigError(err.args[0]) from None
    if isinstance(config, type) and config.__name__.endswith("Config"):
        raise ConfigError(f"config is the class {config.__name__}, not a config: call it, e.g. "
                          f"{config.__name__}() with the settings you want")
    method = getattr(config, "method", None) if not isinstance(config, str) else None
    if isinstance(method, str) and method in names and isinstance(config, get_method(method).config_class):
        return config
    if isinstance(config, PruningConfig):
        raise ConfigError(f"{type(config).__name__} (method {method!r}) is not a registered method; registered: "
                          f"{', '.join(names)} (hf_pruning.register_method adds one)")
    if isinstance(config, str) and config in names:
        hint = f"hf_pruning.{get_method(config).config_class.__name__}(...)"
        raise ConfigError(f"config is the method name {config!r}; pass its config object instead: {hint} "
                          f"(or a dict {{'method': {config!r}, ...}})")
    raise ConfigError(f"config must be a pruning config object, got {reprlib.repr(config)} "
                      f"({type(config).__name__}); the config's class picks the method: {classes}")


def get_plan(model: nn.Module) -> PruningPlan:
    """The plan a model carries (empty for an unpruned model)."""
    return PruningPlan.from_dict(getattr(model.config, "pruning_plan", None))


def _read_plan_file(path: str | os.PathLike) -> str:
    """The text of a plan file; a name that is no file raises PlanError saying what the plan could be."""
    shown = reprlib.repr(os.fspath(path))
    if not str(os.fspath(path)).strip():
        raise PlanError("the plan is an empty string; pass a PruningPlan, a dict or list of ops, JSON text, or the "
                        "path of a JSON plan file")
    try:
        is_file, is_dir = Path(path).is_file(), Path(path).is_dir()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte: no file
        is_file = is_dir = False
    if not is_file:
        what = "a folder" if is_dir else "neither JSON plan text (starting with '{' or '[') nor an existing file"
        raise PlanError(f"the plan {shown} is {what}; pass a PruningPlan, a dict or list of ops, JSON text, or "
                        "the path of a JSON plan file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PlanError(f"cannot read the plan file {shown}: {err}") from None


def _as_plan(plan: Any) -> PruningPlan:
    """A :class:`PruningPlan` from a plan, a dict or list of ops, JSON text or the path of a JSON file."""
    if isinstance(plan, PruningPlan):
        return plan
    source = "the plan"
    if isinstance(plan, os.PathLike) or (isinstance(plan, str) and not plan.lstrip().startswith(("{", "["))):
        source = f"the plan file {reprlib.repr(os.fspath(plan))}"
        plan = _read_plan_file(plan)
    if isinstance(plan, str):
        return PruningPlan.from_json(plan, source=source)
    try:
        return PruningPlan.from_dict(plan)
    except RecursionError:
        raise PlanError(f"{source} {TOO_DEEP}") from None


def _check_tensors(model: nn.Module, plan: PruningPlan) -> None:
    """Every op's declared tensors (``Op.tensor_specs``) are present when required and of the declared shape,
    checked before any surgery."""
    for i, op in enumerate(plan.ops):
        for key, (dims, required) in op.tensor_specs().items():
            shape = tuple(int(getattr(model.config, dim)) for dim in dims)
            value = op.tensors.get(key)
            if value is None and not required:
                continue
            got = None if value is None else tuple(value.shape)
            if got != shape:
                raise PlanError(f"op #{i} ({op.name}): tensors[{key!r}] must be a tensor of shape {list(shape)}, "
                                f"got {got}")


def apply_plan_(model: nn.Module, plan: PruningPlan | dict | list | str) -> nn.Module:
    """Execute a plan on ``model`` in place and record it in ``model.config``; returns the model.

    ``plan`` is a :class:`PruningPlan`, a dict or list of ops, JSON text, or the path of a JSON file.

    The whole plan is validated against the model first, so a bad plan raises and leaves the model unchanged.
    A model that already carries a plan gets the two merged (the new ops run after the old ones). When the
    result cannot be expressed by the stock architecture, the model becomes ``Pruned<Arch>ForCausalLM``.
    """
    check_model(model)
    plan = _as_plan(plan)
    if not plan.ops:
        return model
    simulate_plan(model, plan)
    _check_tensors(model, plan)
    current = get_plan(model)
    base = current.base or base_fields(model.config)
    with torch.no_grad():
        execute_ops_(model, plan.ops)
    merged = PruningPlan(ops=[*current.ops, *plan.ops], base=base)
    _record(model, merged)
    model.hf_pruning_evaluation = None  # numbers measured before this plan no longer describe the model
    logger.info("applied %d op(s); the model now carries %d op(s)", len(plan.ops), len(merged.ops))
    return _bind(model)


def _record(model: nn.Module, plan: PruningPlan, pruning_config: dict | None = None) -> None:
    config = model.config
    config.pruning_plan = plan.to_dict()
    config.hf_pruning_version = __version__
    if pruning_config is not None:
        history = list(getattr(config, "pruning_config", None) or [])
        history.append(pruning_config)
        config.pruning_config = history
    if not plan.is_stock_expressible():
        _to_pruned_class_(model)


def _to_pruned_class_(model: nn.Module) -> None:
    """Switch a live model to ``Pruned<Arch>ForCausalLM`` (same modules, custom save and cache handling)."""
    arch = adapter_for(model).arch
    model_cls, config_cls = PRUNED_MODEL_CLASSES[arch], PRUNED_CONFIG_CLASSES[arch]
    if not isinstance(model, model_cls):
        model.__class__ = model_cls
    if not isinstance(model.config, config_cls):
        model.config.__class__ = config_cls


def _apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            p = params.get(name)
            if p is None or p.shape != keep.shape:
                raise ValueError(f"mask for {name!r} does not match a parameter of the model")
            p.mul_(keep.to(device=p.device, dtype=p.dtype))


def prune_(model: nn.Module, config, calibration: torch.Tensor | None = None,
           compensation_calibration: torch.Tensor | None = None) -> nn.Module:
    """Prune ``model`` in place with the method that ``config``'s class names; returns the model.

    ``config`` is a method config (e.g. ``hf_pruning.WandaConfig()``) or its JSON form, a dict with a ``"method"``
    key (what ``config.json``'s ``pruning_config`` records). ``calibration`` is a LongTensor of token ids
    ``[n_samples, seq_len]`` for methods that need data. ``compensation_calibration`` (same form; depth methods
    with ``compensate=True`` only) is what the compensation projection is fitted on instead of ``calibration``:
    a d x d fit wants thousands of tokens, a greedy search is cheaper on few.

    The model (:func:`check_model`), the config and the ids (:func:`hf_pruning.calibration.check_calibration`)
    are checked before anything changes: bad input raises and leaves the model as it was.
    """
    check_model(model)
    config = _as_config(config)
    spec = get_method(config)
    extra = {}
    if calibration is not None:
        calibration = check_calibration(model, calibration)
    if compensation_calibration is not None:
        if not getattr(config, "compensate", False):
            raise ValueError(f"compensation_calibration is only used by depth methods with compensate=True "
                             f"(shortgpt, sleb, finercut, taylor, gradmap); {spec.name!r} with these settings "
                             "fits no compensation: drop the argument or set compensate=True")
        extra["compensation_calibration"] = check_calibration(model, compensation_calibration,
                                                              name="compensation_calibration")
    replay = getattr(config, "order", None) is not None and bool(extra)  # a given order only needs the fit's data
    if spec.needs_calibration and calibration is None and config.uses_calibration() and not replay:
        raise CalibrationError(f"method {spec.name!r} needs calibration token ids [n_samples, seq_len]; {BUILD_HINT}")
    result: PruningResult = spec.run(model, config, calibration, **extra)
    if result.plan is not None and result.plan.ops:
        apply_plan_(model, result.plan)
    if result.masks:
        _apply_masks_(model, result.masks)
    _record(model, get_plan(model), pruning_config=result.record or config.to_dict())
    model.hf_pruning_report = result.report
    model.hf_pruning_evaluation = None  # numbers measured before this pruning no longer describe the model
    return _bind(model)


def parameter_count(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once: ``parameters()`` already skips duplicates)."""
    return sum(p.numel() for p in model.parameters())


def predicted_decoder_params(model: nn.Module, plan: PruningPlan | None = None) -> int:
    """Decoder-layer parameters after ``plan`` (or now), computed from layer shapes without surgery."""
    states = simulate_plan(model, plan) if plan is not None else inspect_model(model)
    return sum(s.num_params() for s in states)


# ---------------------------------------------------------------------------------------------------------
# loading and saving
# ---------------------------------------------------------------------------------------------------------
#: set in a model's ``__dict__`` by :func:`_bind`: the class-level methods below serve this model
_BOUND = "_hf_pruning_bound"


class _ModelMethod:
    """A method :func:`_bind` adds to a model's class (a non-data descriptor).

    On a model that ``_bind`` marked it is ``func`` bound to that model; on any other instance, and on the class
    itself (``type(model).save_pretrained``), it is whatever the class had before: its own attribute or the
    inherited one (transformers' ``save_pretrained``), or no attribute at all.

    Why on the class: a ``types.MethodType`` stored on its own instance is a reference cycle (model -> method ->
    model), so ``del model`` would free nothing until the garbage collector runs (a replaced model's GPU memory
    stays in a loop); a weak reference instead would break ``from_pretrained(path).prune_(config)``, where
    nothing else holds the model while the method runs.
    """

    def __init__(self, func, owner: type, own=None):
        self.func, self.owner, self.own = func, owner, own
        self.name = func.__name__

    def _previous(self, obj, cls: type):
        """What the attribute was without this descriptor."""
        attr = self.own
        if attr is None:
            mro = cls.__mro__
            attr = next((k.__dict__[self.name] for k in mro[mro.index(self.owner) + 1:] if self.name in k.__dict__),
                        None)
        if attr is None:
            raise AttributeError(f"{cls.__name__!r} object has no attribute {self.name!r}")
        return attr.__get__(obj, cls) if hasattr(attr, "__get__") else attr

    def __get__(self, obj, cls=None):
        cls = type(obj) if cls is None else cls
        if obj is not None and obj.__dict__.get(_BOUND, False):
            return types.MethodType(self.func, obj)
        return self._previous(obj, cls)


def _bind(model: nn.Module) -> nn.Module:
    """Give a model ``model.prune_(...)``, ``model.apply_plan_(...)``, an atomic ``save_pretrained`` that writes a
    model card, and a ``push_to_hub`` that uploads the same files in one commit.

    The methods live on the model's class and serve only models marked here (see :class:`_ModelMethod`): the
    model holds no reference to itself, so ``del model`` frees it without the garbage collector.
    """
    from .hub import push_to_hub

    cls = type(model)
    for func in (prune_, apply_plan_, save_pretrained, push_to_hub):
        current = cls.__dict__.get(func.__name__)
        if not (isinstance(current, _ModelMethod) and current.func is func):
            setattr(cls, func.__name__, _ModelMethod(func, cls, own=current))
        old = model.__dict__.get(func.__name__)
        if isinstance(old, types.MethodType) and old.__func__ is func:  # bound per instance by an older version
            del model.__dict__[func.__name__]
    model.__dict__[_BOUND] = True
    return model


def _check_source(pretrained, gguf_file: str | None = None, subfolder: str | None = None) -> None:
    """A local path that does not exist, or a folder that holds no model, fails here with its name, instead of
    deep in the Hub client ("Repo id must be in the form ...") or in transformers."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(os.fspath(pretrained)).expanduser()
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        needed = gguf_file or "config.json"
        if not (folder / needed).is_file():
            raise FileNotFoundError(
                f"{folder} holds no {needed}, so it is not a saved model; pass the folder that "
                "save_pretrained wrote (or a Hub repo id such as 'HuggingFaceTB/SmolLM2-135M-Instruct')"
            )
        return
    if path.exists():
        raise FileNotFoundError(f"{pretrained} is a file; a model is a folder saved with save_pretrained or a Hub "
                                "repo id ('namespace/name'); for a GGUF file pass its folder and gguf_file=<name>")
    try:
        validate_repo_id(str(pretrained))
    except HFValidationError:
        raise FileNotFoundError(
            f"no such folder: {pretrained}; and it cannot be a Hub repo id either ('namespace/name'). Pass the "
            "folder that save_pretrained wrote, or a Hub repo id"
        ) from None


def from_pretrained(pretrained: str | os.PathLike, *args, gguf_file: str | None = None, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` plus ``prune_`` bound to the model.

    With ``gguf_file`` the weights are dequantized by transformers and the quantizer is cleared, so the
    model can be pruned and saved. Defaults to float32 when no dtype is given.
    """
    from transformers import AutoModelForCausalLM

    _check_source(pretrained, gguf_file=gguf_file, subfolder=kwargs.get("subfolder"))
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = torch.float32
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(pretrained, *args, **kwargs)
    if gguf_file is not None:
        clear_quantizer_(model)
    evaluation = Path(pretrained, EVALUATION_NAME)
    if evaluation.is_file():  # what the card quotes; kept so that a re-save or a push keeps the numbers
        model.hf_pruning_evaluation = json.loads(evaluation.read_text())
    return _bind(model)


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args, tokenizer=None, card=None,
                    evaluation: dict | None = None, repo_id: str | None = None, base_model: str | None = None,
                    **kwargs) -> None:
    """Save ``model`` (and ``tokenizer``) into the folder ``save_directory``, keeping every other file in it.

    Like transformers' ``save_pretrained``, the model's files are written into the folder (created when missing)
    and nothing else in it is touched: a user's notes, data or own README.md stay. Files of an earlier save that
    this save leaves out of date are removed after the new files are in place: weight shards, a weight index or a
    single ``model.safetensors`` the new save did not write, hf_pruning's remote code (``*hf_pruning*.py``) when
    the model no longer needs it, and the card, pictures and ``evaluation.json`` an earlier hf_pruning save wrote
    (see :func:`hf_pruning.saving.stale_files`).

    Every file is first written into a staging folder inside the target,
    ``<save_directory>/.hf_pruning-save-<pid>-<host tag>-<random>``, and moved into place with ``os.replace``
    once all are written, so each file appears whole; an exception or interrupt before that leaves the folder as
    it was (and no staging folder). A save killed outright (SIGKILL, power loss) leaves its staging folder
    behind; the next save into the same folder removes the staging folders of processes that no longer run on
    this machine.

    Extra arguments go to transformers' ``save_pretrained`` (e.g. ``max_shard_size``); use
    :func:`hf_pruning.push_to_hub` instead of ``push_to_hub=True``. ``tokenizer=`` saves a tokenizer alongside,
    with a ``tokenizer_config.json`` that names its class, so loading it never needs the model's custom code.

    A model card (``README.md``, see :mod:`hf_pruning.card`) is written with the weights: generated from the
    model's plan and settings plus ``evaluation`` (measured numbers, optional), ``repo_id`` and ``base_model``
    (for the loading snippets and metadata; without ``repo_id`` the snippets name ``path/to/<folder name>``, never
    a local path). A card already in ``save_directory`` that hf_pruning did not write is kept as it is;
    ``card="text"`` (or a ``ModelCard``) writes the user's own card, ``card=False`` none.

    ``evaluation`` defaults to ``model.hf_pruning_evaluation`` and is also written to ``evaluation.json``. It must
    hold JSON values (numbers, strings, booleans, None, lists, dicts); NaN and infinities are legitimate outcomes
    (a diverged perplexity) and are saved as ``null``, which the card shows as not reported. Anything else raises
    ``ValueError`` naming the key, before anything is written.

    Raises ``NotADirectoryError`` when ``save_directory`` is an existing file (nothing is written then).
    """
    from .card import CARD_NAME, is_generated_card, write_card
    from .saving import StagedSave, check_save_directory, clean_evaluation, portable_tokenizer_config

    if kwargs.get("push_to_hub"):
        raise ValueError("push_to_hub=True is not supported by hf_pruning.save_pretrained; save locally and call "
                         "model.push_to_hub(repo_id) (hf_pruning.push_to_hub), which uploads the same files")
    target = check_save_directory(save_directory)
    evaluation = clean_evaluation(evaluation if evaluation is not None else getattr(model, "hf_pruning_evaluation", None))
    with StagedSave(target) as save:
        stage = save.stage
        type(model).save_pretrained(model, stage, *args, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
            portable_tokenizer_config(stage)
        if evaluation:
            (stage / EVALUATION_NAME).write_text(json.dumps(evaluation, indent=2, allow_nan=False))
        keep = save.before.card
        write_card(model, stage, keep=keep, card=card, evaluation=evaluation, repo_id=repo_id, base_model=base_model,
                   location=target.name)
        users_card = card is None and keep is not None and not is_generated_card(keep)
        save.commit(skip={CARD_NAME} if users_card else set())  # a user's card stays as it is, not even rewritten
    if evaluation:
        model.hf_pruning_evaluation = evaluation
    logger.info("saved %s to %s", type(model).__name__, target)


def lora_target_modules(model: nn.Module, names: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """Full names of the real ``nn.Linear`` projections in decoder layers, for ``LoraConfig(target_modules=...)``.

    PEFT cannot pick default targets for a pruned ``model_type`` and matches names by suffix, which would also
    hit the zero-output placeholders of dropped sublayers (OPT's ``fc2``). ``names`` filters by the last name
    component (e.g. ``["q_proj", "v_proj"]``); by default every linear projection is returned.
    """
    layers = adapter_for(model).decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return [
        f"{prefix}.{name}"
        for name, module in layers.named_modules()
        if isinstance(module, nn.Linear) and (names is None or name.rsplit(".", 1)[-1] in names)
    ]
