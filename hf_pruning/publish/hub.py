"""Pushing a pruned model to the Hugging Face Hub: weights, config, remote code and card in one commit.

The folder is produced by :func:`hf_pruning.save_pretrained` (so the Hub gets exactly what a local save
writes), then uploaded with ``huggingface_hub.HfApi.upload_folder``: one commit, which the Hub applies all at
once, so a failed push leaves the repository as it was. The card is decided first: when the repository
already has a README.md that hf_pruning did not generate, it is left out of the upload and stays as it is.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from torch import nn

from ..api import from_pretrained
from ..engine.distributed import main_rank_only
from ..model_methods import model_method
from ..saving import CARD_NAME, is_generated_card
from .save import save_pretrained

logger = logging.getLogger(__name__)


class HubPushError(RuntimeError):
    """The push did not happen (no token, the Hub refused, or the upload failed); nothing was committed."""


def _check_repo_id(repo_id) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a string like 'your-name/model-name', got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(
            f"{repo_id!r} is not a valid Hub repo id: {err} Use 'namespace/name' with letters, digits, '-', '_' "
            "and '.' (at most 96 characters, no '--' or '..')."
        ) from None
    return repo_id


def _resolve_token(token):
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubPushError(
            "no Hugging Face token: pass token=..., set the HF_TOKEN environment variable, or run `hf auth login`"
        )
    return token


def _remote_user_card(api, repo_id: str, revision: str | None, folder: Path) -> bool:
    """True when the repository already has a README.md that hf_pruning did not write (it must stay)."""
    if not api.file_exists(repo_id, CARD_NAME, revision=revision):
        return False
    path = api.hf_hub_download(repo_id, CARD_NAME, revision=revision, cache_dir=folder / ".remote-card")
    return not is_generated_card(Path(path).read_text(encoding="utf-8"))


@model_method
@main_rank_only("the push to the Hub")
def push_to_hub(model: nn.Module, repo_id: str, *, tokenizer=None, token: str | None = None,
                private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
                create_pr: bool = False, evaluation: dict | None = None, card=None, base_model: str | None = None,
                endpoint: str | None = None, dry_run: bool = False):
    """Upload ``model`` (and ``tokenizer``) to ``repo_id`` with its model card in a single commit.

    ``private``, ``revision`` (a branch, created when missing), ``commit_message`` and ``create_pr`` pass through
    to huggingface_hub; ``token`` defaults to the logged-in token (``HF_TOKEN`` / ``hf auth login``); ``endpoint``
    points at another Hub. ``evaluation``, ``card`` and ``base_model`` are those of
    :func:`hf_pruning.save_pretrained`. ``dry_run=True`` checks the inputs and builds the folder without any
    network access or token, returning ``{"repo_id", "revision", "files", "card"}``; otherwise the
    ``CommitInfo`` of the upload. Raises ``ValueError`` for a bad repo id and :class:`HubPushError` when the push
    could not be done (nothing is committed then).
    """
    from huggingface_hub import HfApi

    _check_repo_id(repo_id)
    token = None if dry_run else _resolve_token(token)
    with tempfile.TemporaryDirectory(prefix="hf_pruning-push-") as work:
        folder = Path(work) / "model"
        save_pretrained(model, folder, tokenizer=tokenizer, card=card, evaluation=evaluation, repo_id=repo_id,
                        base_model=base_model)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        if dry_run:
            card_path = folder / CARD_NAME
            text = card_path.read_text(encoding="utf-8") if card_path.exists() else None
            logger.info("dry run: would upload %d files to %s", len(files), repo_id)
            return {"repo_id": repo_id, "revision": revision, "files": files, "card": text}
        api = HfApi(endpoint=endpoint, token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            ignore = None
            if card is None and _remote_user_card(api, repo_id, revision, Path(work)):
                logger.info("%s already has its own README.md; it is left unchanged", repo_id)
                ignore = [CARD_NAME]
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr or None,
                commit_message=commit_message or f"Upload {type(model).__name__} pruned with hf_pruning",
                ignore_patterns=ignore,
            )
        except Exception as err:  # huggingface_hub raises HfHubHTTPError, OSError, ...: one clear message
            raise HubPushError(f"pushing to {repo_id} failed, nothing was committed: {type(err).__name__}: {err}") from err
    logger.info("pushed %d files to %s (%s)", len(files), repo_id, getattr(info, "commit_url", ""))
    return info


def push_folder(folder: str | os.PathLike, repo_id: str, **kwargs):
    """Push a saved pruned model folder (``hf-prune push``): load it with hf_pruning, then :func:`push_to_hub`.

    The card is regenerated for ``repo_id`` with the folder's ``evaluation.json``; a README.md in the folder that
    hf_pruning did not write is uploaded as it is instead."""
    _check_repo_id(repo_id)
    model = from_pretrained(folder)
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        logger.info("no tokenizer in %s; pushing the model only", folder)
    card_path = Path(folder) / CARD_NAME
    if kwargs.get("card") is None and card_path.is_file():
        text = card_path.read_text(encoding="utf-8")
        kwargs["card"] = None if is_generated_card(text) else text
    return push_to_hub(model, repo_id, tokenizer=tokenizer, **kwargs)
