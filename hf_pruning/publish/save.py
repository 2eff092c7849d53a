"""Saving a pruned model: the atomic ``save_pretrained`` that writes the weights, the remote code, the model card
and ``evaluation.json`` into a folder (see :mod:`hf_pruning.saving` for the staging and :mod:`.card`)."""

from __future__ import annotations

import json
import logging
import os

from torch import nn

from ..engine.distributed import main_rank_only
from ..engine.streaming import needs_streaming, save_streamed
from ..model_methods import model_method
from ..saving import (
    CARD_NAME,
    EVALUATION_NAME,
    StagedSave,
    check_save_directory,
    clean_evaluation,
    is_generated_card,
    portable_tokenizer_config,
)
from .card import write_card

logger = logging.getLogger(__name__)


@model_method
@main_rank_only("the save")
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

    A model whose weights accelerate offloads (``device_map`` with ``"cpu"``/``"disk"``, ``cpu_offload``) is saved
    one tensor at a time into the same files (:func:`hf_pruning.engine.streaming.save_streamed`), never whole.

    Extra arguments go to transformers' ``save_pretrained`` (e.g. ``max_shard_size``); use
    :func:`hf_pruning.push_to_hub` instead of ``push_to_hub=True``. ``tokenizer=`` saves a tokenizer alongside,
    with a ``tokenizer_config.json`` that names its class, so loading it never needs the model's custom code.

    A model card (``README.md``, see :mod:`hf_pruning.publish.card`) is written with the weights: generated from the
    model's plan and settings plus ``evaluation`` (measured numbers, optional), ``repo_id`` and ``base_model``
    (for the loading snippets and metadata; without ``repo_id`` the snippets name ``path/to/<folder name>``, never
    a local path). A card already in ``save_directory`` that hf_pruning did not write is kept as it is;
    ``card="text"`` (or a ``ModelCard``) writes the user's own card, ``card=False`` none.

    ``evaluation`` defaults to ``model.hf_pruning_evaluation`` and is also written to ``evaluation.json``. It must
    hold JSON values (numbers, strings, booleans, None, lists, dicts); NaN and infinities are legitimate outcomes
    (a diverged perplexity) and are saved as ``null``, which the card shows as not reported. Anything else raises
    ``ValueError`` naming the key, before anything is written.

    Raises ``NotADirectoryError`` when ``save_directory`` is an existing file (nothing is written then).

    Under a ``torch.distributed`` process group (``torchrun``) only rank 0 writes; every rank returns once the
    save is done, and raises when it failed.
    """
    if kwargs.get("push_to_hub"):
        raise ValueError("push_to_hub=True is not supported by hf_pruning.save_pretrained; save locally and call "
                         "model.push_to_hub(repo_id) (hf_pruning.push_to_hub), which uploads the same files")
    target = check_save_directory(save_directory)
    evaluation = clean_evaluation(evaluation if evaluation is not None else getattr(model, "hf_pruning_evaluation", None))
    with StagedSave(target) as save:
        stage = save.stage
        if needs_streaming(model):  # offloaded weights: written one tensor at a time, never the whole model
            save_streamed(model, stage, *args, **kwargs)
        else:
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
