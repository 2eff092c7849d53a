"""Resume a long layer-by-layer run after a crash: a per-layer checkpoint folder.

Inside :func:`resumable` (``prune_(..., checkpoint_dir=...)``), :func:`~hf_pruning.engine.sequential` writes,
after every finished layer, that layer's tensors, the next layer's inputs and the reports so far, then records
the progress atomically. A later run of the same method on the same model and calibration with the same folder
loads the finished layers' tensors (through ``write_param``, so offloaded copies get them too) and the stored
inputs, and goes on from the first unfinished layer. A folder written by a different run is refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from .offload import write_param
from .store import ActivationStore

logger = logging.getLogger(__name__)

_FOLDER: contextvars.ContextVar[str | None] = contextvars.ContextVar("hf_pruning_checkpoint", default=None)
PROGRESS = "progress.json"


class CheckpointMismatchError(ValueError):
    """The checkpoint folder holds the progress of a different run (method, model or calibration)."""


@contextlib.contextmanager
def resumable(folder: str | os.PathLike | None):
    """Layer-by-layer runs during the block checkpoint into ``folder`` and resume from it (``None``: off)."""
    token = _FOLDER.set(os.fspath(folder) if folder is not None else None)
    try:
        yield
    finally:
        _FOLDER.reset(token)


def run_key(model, calibration: torch.Tensor, desc: str, batch_size: int) -> str:
    """What identifies a run: the stage, the model's name, shape and pruning plan, the calibration ids, the batch."""
    config = model.config
    digest = hashlib.sha256(calibration.cpu().numpy().tobytes()).hexdigest()[:16]
    plan = json.dumps(getattr(config, "pruning_plan", None), sort_keys=True, default=str)
    return json.dumps({"stage": desc, "model": getattr(config, "_name_or_path", ""), "type": config.model_type,
                       "layers": config.num_hidden_layers, "hidden": config.hidden_size, "plan": plan,
                       "calibration": [list(calibration.shape), digest], "batch": batch_size}, sort_keys=True)


class LayerCheckpoint:
    """The checkpoint folder of one run (``key``); ``done`` finished layers so far."""

    def __init__(self, folder: str, key: str):
        self.folder, self.key = folder, key
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, PROGRESS)
        self.done, self.reports = 0, []
        if os.path.exists(path):
            with open(path) as f:
                progress = json.load(f)
            if progress["key"] != key:
                raise CheckpointMismatchError(
                    f"checkpoint folder {folder} holds the progress of another run ({progress['key']}), not of "
                    f"this one ({key}); pass another checkpoint_dir, or delete the folder to start over")
            self.done, self.reports = progress["done"], progress["reports"]

    @staticmethod
    def active(model, calibration: torch.Tensor, desc: str, batch_size: int) -> LayerCheckpoint | None:
        """The checkpoint of this run when :func:`resumable` is on, else None."""
        folder = _FOLDER.get()
        return None if folder is None else LayerCheckpoint(os.path.join(folder, desc), run_key(
            model, calibration, desc, batch_size))

    def restore(self, layers, store_folder) -> ActivationStore | None:
        """Put the finished layers' tensors back and return the first unfinished layer's inputs (None: none done)."""
        if not self.done:
            return None
        logger.info("resuming from %s: %d of %d layers done", self.folder, self.done, len(layers))
        for i in range(self.done):
            for key, value in load_file(os.path.join(self.folder, f"layer_{i}.safetensors")).items():
                owner, _, name = key.rpartition(".")
                write_param(layers[i].get_submodule(owner) if owner else layers[i], name, value)
        inputs = ActivationStore(store_folder)
        saved = load_file(os.path.join(self.folder, "inputs.safetensors"))
        for b in range(len(saved)):
            inputs.append(saved[f"batch_{b}"])
        return inputs

    def save(self, index: int, layer, outputs: ActivationStore, reports: list) -> None:
        """Record layer ``index`` finished (call with the layer onloaded): its tensors, ``outputs``, ``reports``."""
        tensors = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        save_file(tensors, os.path.join(self.folder, f"layer_{index}.safetensors"))
        batches = {f"batch_{b}": outputs[b].contiguous() for b in range(len(outputs))}
        save_file(batches, os.path.join(self.folder, "inputs.tmp"))
        os.replace(os.path.join(self.folder, "inputs.tmp"), os.path.join(self.folder, "inputs.safetensors"))
        self.done, self.reports = index + 1, list(reports)
        tmp = os.path.join(self.folder, PROGRESS + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"key": self.key, "done": self.done, "reports": self.reports}, f, default=str)
        os.replace(tmp, os.path.join(self.folder, PROGRESS))

    def finish(self) -> None:
        """The run completed: the folder is no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)
