"""The functional core: ``prune_``, ``apply_plan_``, ``from_pretrained``, ``lora_target_modules``.

Saving and pushing (``save_pretrained``, ``push_to_hub``) live in :mod:`hf_pruning.publish`, above this module:
models get them as methods through :mod:`hf_pruning.model_methods`, whose table ``publish`` fills on import.
"""

from __future__ import annotations

import json
import logging
import os
import reprlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration.check import BUILD_HINT, CalibrationError, check_calibration
from .config import ConfigError, PruningConfig
from .engine import LAYER_BATCH, activations_on_disk, distributed, resumable
from .engine.offload import edited, is_offloaded
from .model_checks import check_model, clear_quantizer_
from .model_methods import bind, model_method
from .plan import PlanError, PruningPlan, get_plan
from .registry import PruningResult, check_inputs, get_method, list_methods
from .remote.configuration_hf_pruning import PRUNED_CONFIG_CLASSES
from .remote.hf_pruning_plan import TOO_DEEP
from .remote.hf_pruning_surgery import adapter_for, base_fields, execute_ops_, simulate_plan
from .remote.modeling_hf_pruning import PRUNED_MODEL_CLASSES
from .saving import EVALUATION_NAME
from .version import __version__

logger = logging.getLogger(__name__)


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
    On a model whose weights accelerate offloads (CPU or disk), each touched decoder layer is onloaded once and
    the edits are written to the offloaded copies; the hooks stay in place.
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
        if is_offloaded(model):
            _execute_offloaded_(model, plan.ops)
        else:
            execute_ops_(model, plan.ops)
    merged = PruningPlan(ops=[*current.ops, *plan.ops], base=base)
    record_pruning(model, merged)
    model.hf_pruning_evaluation = None  # numbers measured before this plan no longer describe the model
    logger.info("applied %d op(s); the model now carries %d op(s)", len(plan.ops), len(merged.ops))
    return bind(model)


def _execute_offloaded_(model: nn.Module, ops: list) -> None:
    """``execute_ops_`` on a model whose weights accelerate offloads: each run of consecutive ops on one decoder
    layer executes with that layer onloaded once (``engine.edited``), and every tensor they changed is written
    to its offloaded copy; ops on the model (``remove_layers``) only move modules. Modules an op creates anew
    (e.g. Gemma2's unfused compensation) stay in memory on the execution device."""
    layers = adapter_for(model).decoder_layers
    start = 0
    while start < len(ops):
        index = getattr(ops[start], "layer", None)
        end = start + 1
        while index is not None and end < len(ops) and getattr(ops[end], "layer", None) == index:
            end += 1
        if index is None:
            execute_ops_(model, ops[start:end])
        else:
            with edited(layers(model)[index]):
                execute_ops_(model, ops[start:end])
        start = end


def record_pruning(model: nn.Module, plan: PruningPlan, pruning_config: dict | None = None) -> None:
    """Write ``plan`` (and append ``pruning_config`` to the list of recorded steps) into ``model.config``."""
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


def prune_(model: nn.Module, config, calibration: torch.Tensor | None = None,
           compensation_calibration: torch.Tensor | None = None, *, activations_dir: str | os.PathLike | None = None,
           checkpoint_dir: str | os.PathLike | None = None) -> nn.Module:
    """Prune ``model`` in place with the method that ``config``'s class names; returns the model.

    ``config`` is a method config (e.g. ``hf_pruning.WandaConfig()``) or its JSON form, a dict with a ``"method"``
    key (what ``config.json``'s ``pruning_config`` records). ``calibration`` is a LongTensor of token ids
    ``[n_samples, seq_len]`` for methods that need data. ``compensation_calibration`` (same form) is a method
    input: data a method's config declares (``config.inputs``), here the depth methods' with ``compensate=True``,
    which fit the compensation projection on it instead of ``calibration`` (a d x d fit wants thousands of
    tokens, a greedy search is cheaper on few). A method input the settings do not use is refused.

    ``activations_dir``: keep calibration activations in files there (memory-mapped) instead of CPU memory, for
    calibration sets larger than RAM. ``checkpoint_dir``: the layer-by-layer mask methods (Wanda, SparseGPT,
    LLM-Barber) record every finished layer there; after a crash, the same call resumes from the first unfinished
    layer (a folder of another run is refused); it is removed when the run completes.

    The model (:func:`check_model`), the config and the ids (:func:`hf_pruning.calibration.check_calibration`)
    are checked before anything changes: bad input raises and leaves the model as it was.
    """
    with distributed.together("checking the model, config and calibration"):
        check_model(model)
        config = _as_config(config)
        spec = get_method(config)
        if calibration is not None:
            calibration = check_calibration(model, calibration)
        # method inputs (data besides calibration that a config declares in ``inputs``): one path for all of them
        inputs = {k: v for k, v in {"compensation_calibration": compensation_calibration}.items() if v is not None}
        check_inputs(config, inputs)
        inputs = {name: check_calibration(model, ids, name=name) for name, ids in inputs.items()}
        if spec.needs_calibration and calibration is None and config.calibration_required(inputs):
            raise CalibrationError(f"method {spec.name!r} needs calibration token ids [n_samples, seq_len]; "
                                   f"{BUILD_HINT}")
        for ids in (calibration, *inputs.values()):
            if ids is not None and distributed.active():
                distributed.check_enough_rows(ids.shape[0], LAYER_BATCH)
    if distributed.active():  # data parallel: the same call everywhere, each rank on its own rows
        distributed.agree("model, config or calibration", distributed.digest_of(
            get_plan(model).to_json(), json.dumps(config.to_dict(), sort_keys=True, default=str),
            distributed.model_sample(model), *(ids for ids in (calibration, *inputs.values()) if ids is not None)))
        calibration = distributed.shard(calibration, LAYER_BATCH)
        inputs = {name: distributed.shard(ids, LAYER_BATCH) for name, ids in inputs.items()}
        checkpoint_dir = distributed.rank_folder(checkpoint_dir)
    with activations_on_disk(activations_dir), resumable(checkpoint_dir):
        result: PruningResult = spec.run(model, config, calibration, **inputs)
    if result.plan is not None and result.plan.ops:
        apply_plan_(model, result.plan)
    record_pruning(model, get_plan(model), pruning_config=result.record or config.to_dict())
    model.hf_pruning_report = result.report
    model.hf_pruning_evaluation = None  # numbers measured before this pruning no longer describe the model
    return bind(model)


# ---------------------------------------------------------------------------------------------------------
# loading (saving and pushing: hf_pruning.publish)
# ---------------------------------------------------------------------------------------------------------
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

    The model keeps the checkpoint's dtype (``dtype="auto"``: a bf16 checkpoint prunes and saves in bf16) unless
    ``dtype=`` says otherwise. With ``gguf_file`` the weights are dequantized by transformers (to float32 unless
    ``dtype=`` is given) and the quantizer is cleared, so the model can be pruned and saved.
    """
    from transformers import AutoModelForCausalLM

    _check_source(pretrained, gguf_file=gguf_file, subfolder=kwargs.get("subfolder"))
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = "auto" if gguf_file is None else torch.float32
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(pretrained, *args, **kwargs)
    if gguf_file is not None:
        clear_quantizer_(model)
    evaluation = Path(pretrained, EVALUATION_NAME)
    if evaluation.is_file():  # what the card quotes; kept so that a re-save or a push keeps the numbers
        model.hf_pruning_evaluation = json.loads(evaluation.read_text())
    return bind(model)


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


# model.prune_(...) and model.apply_plan_(...) on every model bind() marks (publish adds the saving methods)
model_method(prune_)
model_method(apply_plan_)
