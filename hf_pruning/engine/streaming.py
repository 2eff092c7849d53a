"""Saving and loading models that do not fit in memory: a streaming safetensors writer and the loading settings.

**Saving.** transformers' ``save_pretrained`` (5.x) gathers each shard as a dict of tensors before writing it
(``max_shard_size`` defaults to 50GB, so for any model below that the whole model), reads offloaded weights from
the hooks' ``weights_map`` only when the model carries an ``hf_device_map`` with ``"cpu"``/``"disk"`` entries, and
fails with "Cannot copy out of meta tensor" on a model offloaded by ``accelerate.cpu_offload``/``disk_offload``.
:func:`save_streamed` writes the same files instead (the same shard split and file names, the same keys with tied
aliases and ``_keys_to_ignore_on_save`` left out, the same ``model.safetensors.index.json``, the config, the
generation config and any remote code written by transformers itself), but each tensor is materialised on its
own (from the live module or its hook's ``weights_map``), written straight into its place in the shard file and
dropped: the writer never holds more than one tensor.

**Loading.** ``from_pretrained(path, device_map="auto", max_memory={"cpu": ...}, offload_folder=...)`` (transformers,
and ``hf_pruning.from_pretrained`` which passes them through) puts the modules that exceed ``max_memory`` on
``"disk"``; for a safetensors checkpoint those weights are not copied but read from the checkpoint's own shard
files one module at a time, converted to the requested dtype on each read. :func:`offload_settings` builds
those arguments.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .offload import is_offloaded, offload_hook

logger = logging.getLogger(__name__)

#: safetensors' names of the torch dtypes
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


@dataclass
class StreamStats:
    """What a streaming save wrote: ``tensors``, ``bytes`` in all, ``largest`` (bytes of the biggest tensor, the
    most the writer held at once) and ``files`` (the weight files, relative to the folder)."""

    tensors: int = 0
    bytes: int = 0
    largest: int = 0
    files: tuple[str, ...] = ()


def _variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.<variant>.safetensors`` (transformers' naming of variants)."""
    if not variant:
        return name
    parts = name.split(".")
    return ".".join([*parts[:-1], variant, parts[-1]])


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors transformers' ``save_pretrained`` writes, by name: ``model.state_dict()`` less
    ``_keys_to_ignore_on_save`` and less tied aliases (e.g. ``lm_head.weight`` under ``tie_word_embeddings``).
    Offloaded tensors are on ``meta`` here (shape and dtype only); nothing is read."""
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    try:
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # pragma: no cover - transformers 5.x has it
        state = _drop_aliases(model, state)
    else:
        state = remove_tied_weights_from_state_dict(state, model)
    # offloading (accelerate.cpu_offload) gives tied weights separate meta parameters, which the pointer test above
    # cannot pair: drop the declared tied targets too, as a save of the same model in memory does
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if source in state and target in state:
            del state[target]
    return state


def _drop_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep the first name of every parameter object that appears under several names."""
    seen, kept = set(), {}
    for name, tensor in state.items():
        try:
            key = id(model.get_parameter(name))
        except AttributeError:
            key = ("buffer", name)
        if key not in seen:
            seen.add(key)
            kept[name] = tensor
    return kept


def read_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """Tensor ``name`` of ``model`` on the CPU, in its live dtype: the live tensor, or for an offloaded one (on
    ``meta``) the copy in its accelerate hook's ``weights_map`` (read from disk for disk offload).

    Returns a new tensor object (sharing storage where nothing had to be read), so a caller that drops it frees
    whatever was read."""
    module_name, _, leaf = name.rpartition(".")
    live = getattr(model.get_submodule(module_name), leaf)
    if live.device.type != "meta":
        return live.detach().to("cpu")
    parts = module_name.split(".") if module_name else []
    for depth in range(len(parts), -1, -1):  # the innermost module whose hook holds the tensor
        owner = model.get_submodule(".".join(parts[:depth]))
        hook = offload_hook(owner)
        key = ".".join([*parts[depth:], leaf])
        if hook is not None and hook.weights_map is not None and key in hook.weights_map:
            return hook.weights_map[key].detach().to(device="cpu", dtype=live.dtype)
    raise RuntimeError(f"{name} is on the meta device but no accelerate hook holds its offloaded copy; the model "
                       "was not dispatched by accelerate (load it with device_map=..., or move it off meta)")


def write_safetensors(path: str | os.PathLike, specs: dict[str, torch.Tensor], fetch: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None, written: Callable[[str], None] | None = None) -> int:
    """Write a safetensors file of the tensors named in ``specs`` (any tensors, ``meta`` included, giving dtype and
    shape) whose data ``fetch(name)`` returns one at a time; each is written and dropped before the next is fetched
    (and ``written(name)`` called). Returns the largest number of bytes held at once (one tensor's)."""
    if sys.byteorder != "little":  # pragma: no cover
        raise RuntimeError("safetensors files are little-endian; writing them on a big-endian machine is not supported")
    header, offset = {}, 0
    for name, spec in specs.items():
        if spec.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"cannot save {name}: dtype {spec.dtype} has no safetensors name")
        size = spec.numel() * spec.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    largest = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for name, spec in specs.items():
            tensor = fetch(name)
            if tuple(tensor.shape) != tuple(spec.shape) or tensor.dtype != spec.dtype:
                raise RuntimeError(f"{name}: read {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(spec.shape)} "
                                   f"{spec.dtype}")
            data = tensor.contiguous().reshape(-1).view(torch.uint8)  # [numel * element size] bytes
            largest = max(largest, data.numel())
            out.write(data.numpy().data)
            del tensor, data
            if written is not None:
                written(name)
    return largest


def _offload_file(model: nn.Module, name: str):
    """``(loader, key, path)`` when tensor ``name`` is offloaded into a ``.dat`` file of an offload folder (an edit
    written there by :func:`~hf_pruning.engine.write_param`, or a weight transformers copied there at load), else
    ``None`` (in memory, in a CPU ``weights_map`` or read from a checkpoint's safetensors file)."""
    module_name, _, leaf = name.rpartition(".")
    if getattr(model.get_submodule(module_name), leaf).device.type != "meta":
        return None
    parts = module_name.split(".") if module_name else []
    for depth in range(len(parts), -1, -1):
        hook = offload_hook(model.get_submodule(".".join(parts[:depth])))
        weights_map = getattr(hook, "weights_map", None)
        dataset = getattr(weights_map, "dataset", weights_map)
        key = getattr(weights_map, "prefix", "") + ".".join([*parts[depth:], leaf])
        index = getattr(dataset, "index", None)
        if index is not None and key in index and key not in dataset.state_dict:
            entry = index[key]
            if entry.get("safetensors_file") is None and getattr(dataset, "save_folder", None):
                return dataset, key, Path(dataset.save_folder, f"{key}.dat")
            return None
    return None


def _released(model: nn.Module, shard: Path) -> Callable[[str], None]:
    """A ``written`` callback that deletes each tensor's offload-folder file once it is in ``shard`` and points the
    offload index at the tensor in ``shard`` instead (read from there from now on, converted to the live dtype)."""

    def written(name: str) -> None:
        found = _offload_file(model, name)
        if found is None:
            return
        dataset, key, path = found
        module_name, _, leaf = name.rpartition(".")
        dtype = str(getattr(model.get_submodule(module_name), leaf).dtype).removeprefix("torch.")
        dataset.index[key] = {"safetensors_file": str(shard), "weight_name": name, "dtype": dtype}
        path.unlink(missing_ok=True)

    return written


def _check_plain_names(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Refuse models whose saved names differ from their module names (transformers' weight conversions, e.g.
    fused MoE experts): those must be converted back across tensors, which this writer does not do."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # pragma: no cover
        return
    try:
        reverted = revert_weight_conversion(model, dict(state))
    except Exception:  # a conversion that cannot even run on meta tensors
        reverted = None
    if reverted is None or set(reverted) != set(state):
        raise NotImplementedError(f"{type(model).__name__} saves its weights under converted names; the streaming "
                                  "save writes module names only. Save it with transformers' save_pretrained and a "
                                  "small max_shard_size (memory is then bounded by one shard)")


def save_streamed(model: nn.Module, save_directory: str | os.PathLike, *args, max_shard_size: int | str = "50GB",
                  variant: str | None = None, release_offload: bool = False, **kwargs) -> StreamStats:
    """Save ``model`` into ``save_directory`` like ``type(model).save_pretrained`` would, holding one tensor at a time.

    The files are those transformers writes (config, generation config, remote code, ``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` split by ``max_shard_size`` plus ``model.safetensors.index.json``, with the
    same keys); offloaded weights are read from their accelerate hook (so edits made with
    :func:`~hf_pruning.engine.write_param` are saved). Other arguments go to transformers' ``save_pretrained``,
    which writes everything but the weights.

    ``release_offload=True`` is for disks with no room for a second copy of the edited weights: each weight held in
    an offload folder's ``.dat`` file is deleted once written, and the model reads it from the saved shard from then
    on (so ``save_directory`` must stay where it is while the model is used; an interrupted save leaves the model
    without those weights). Disk use then grows by the weights that were in memory, not by the whole model.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    if kwargs.get("state_dict") is not None:
        raise ValueError("save_streamed reads the model's own tensors; a state_dict= cannot be streamed")
    kwargs.pop("state_dict", None)
    state = saved_state(model)
    _check_plain_names(model, state)
    folder = Path(save_directory)
    with warnings.catch_warnings():  # the "offloaded modules ... 50GB" warning is about the weights, not written here
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        type(model).save_pretrained(model, folder, *args, state_dict={}, max_shard_size=max_shard_size,
                                    variant=variant, **kwargs)
    pattern = _variant(WEIGHTS_NAME, variant).replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(state, filename_pattern=pattern, max_shard_size=max_shard_size)
    stats = StreamStats(files=tuple(split.filename_to_tensors))
    for shard, names in split.filename_to_tensors.items():
        specs = {name: state[name] for name in names}
        written = _released(model, (folder / shard).resolve()) if release_offload else None
        largest = write_safetensors(folder / shard, specs, lambda name: read_tensor(model, name), {"format": "pt"},
                                    written)
        stats.largest = max(stats.largest, largest)
        stats.tensors += len(names)
        stats.bytes += sum(t.numel() * t.element_size() for t in specs.values())
        logger.debug("wrote %s (%d tensors)", shard, len(names))
    if split.is_sharded:
        tied = set(getattr(model, "all_tied_weights_keys", None) or ())  # separate objects once offloaded
        total = sum(p.numel() for n, p in model.named_parameters() if n in state or n not in tied)
        index = {"metadata": {"total_parameters": total, **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (folder / _variant(WEIGHTS_INDEX_NAME, variant)).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    logger.info("streamed %d tensors (%.1f MB) into %s", stats.tensors, stats.bytes / 1e6, folder)
    return stats


def needs_streaming(model: nn.Module) -> bool:
    """Whether saving ``model`` must stream: some of its weights are held off-device by accelerate hooks."""
    return is_offloaded(model)


def offload_settings(cpu: int | str, offload_folder: str | os.PathLike, gpus: dict | None = None) -> dict:
    """The ``from_pretrained`` arguments that load a model bigger than memory: ``device_map="auto"``, ``max_memory``
    (``cpu`` bytes or a size such as ``"8GiB"`` of RAM for weights; ``gpus`` as ``{index: size}``) and
    ``offload_folder`` (where edited offloaded weights go; the checkpoint's own files are read, never written).

    The checkpoint should be safetensors: transformers then reads disk-offloaded weights straight from its shard
    files, one module at a time, instead of copying them into the offload folder first."""
    max_memory = dict(gpus or {})
    max_memory["cpu"] = cpu
    os.makedirs(offload_folder, exist_ok=True)
    return {"device_map": "auto", "max_memory": max_memory, "offload_folder": os.fspath(offload_folder)}
