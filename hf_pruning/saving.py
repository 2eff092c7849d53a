"""Writing a model folder without losing anything that was already in it.

:func:`hf_pruning.save_pretrained` writes every file of a save into a staging folder *inside* the target
(``<target>/.hf_pruning-save-<pid>-<host tag>-<random>``; inside, so that moving a file is a rename on one file
system), then moves the files into place one by one with ``os.replace`` (each file appears whole), and only
then removes the files of an earlier save that this save did not rewrite (:func:`stale_files`). Every other
file in the folder is left alone, as transformers' own ``save_pretrained`` does.

A save killed with SIGKILL cannot remove its staging folder. The next save into the same folder removes
staging folders whose owner process (the pid in the name, on this machine: the host tag is a short hash of
the host name) no longer runs; folders of live processes and of other machines are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: staging folders are named ``<STAGING_PREFIX><pid>-<host tag>-<random>``
STAGING_PREFIX = ".hf_pruning-save-"
_STAGING = re.compile(rf"^{re.escape(STAGING_PREFIX)}(?P<pid>\d+)-(?P<host>[0-9a-f]{{8}})-[A-Za-z0-9_]+$")
# left next to the target by hf_pruning releases that swapped the whole folder (never removed: see warning)
_LEGACY_STAGING = re.compile(r"^\..+\.(tmp-[A-Za-z0-9_]+|old-\d+)$")

# weight files transformers writes (``_add_variant``: model.fp16.safetensors, model.fp16-00001-of-00002.safetensors,
# model.safetensors.index.fp16.json); a group is the variant ("" for none)
_WEIGHTS = re.compile(r"^model(?P<variant>\.[A-Za-z0-9_]+)?(?:-\d{5}-of-\d{5})?\.safetensors$")
_WEIGHTS_INDEX = re.compile(r"^model\.safetensors\.index(?P<variant>\.[A-Za-z0-9_]+)?\.json$")
# the remote code hf_pruning copies next to the weights (see hf_pruning/remote: every name carries the prefix)
_REMOTE_CODE = re.compile(r"^(?:hf_pruning_\w+|configuration_hf_pruning|modeling_hf_pruning)\.py$")
CARD_NAME = "README.md"
#: measured numbers saved next to the weights (the model card quotes them)
EVALUATION_NAME = "evaluation.json"
REMOVAL_MAP_NAME = "pruning_map.png"
SPARSITY_PICTURE_NAME = "sparsity.png"
PICTURE_NAMES = (REMOVAL_MAP_NAME, SPARSITY_PICTURE_NAME)
#: the first line of every card hf_pruning generates (a later save or push may refresh such a card)
GENERATED_MARKER = "<!-- hf_pruning:generated-card"
# written last, so a reader sees the new configuration only once the weights it describes are in place
_LAST = ("config.json", CARD_NAME)


def is_generated_card(text: str) -> bool:
    """True when ``text`` is a card hf_pruning wrote (and may therefore refresh)."""
    return GENERATED_MARKER in text


def host_tag() -> str:
    """8 hex digits naming this machine in staging folder names (a hash: the host name itself is not written)."""
    return hashlib.blake2s(socket.gethostname().encode(), digest_size=4).hexdigest()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine; when that cannot be told, True (its folder is kept)."""
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:
        pass
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists and belongs to someone else
        return True
    return True


def check_save_directory(save_directory: str | os.PathLike) -> Path:
    """The absolute folder to save into; raises before anything is written when it cannot be a folder.

    Raises ``ValueError`` for an empty path and ``NotADirectoryError`` when the path (or a folder above it) is an
    existing file.
    """
    if save_directory is None or (isinstance(save_directory, (str, bytes)) and not str(save_directory).strip()):
        raise ValueError(f"save_directory must name a folder, got {save_directory!r}; pass '.' to save into the "
                         "working directory")
    target = Path(os.fspath(save_directory)).resolve()
    for path in (target, *target.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == target else f"is under {path}, which is a file"
                raise NotADirectoryError(
                    f"cannot save a model into {target}: it {what}, not a folder. Pick a folder (it is created when "
                    "missing); a file is never replaced by a save"
                )
            break
    return target


@dataclass
class FolderState:
    """What a folder held before a save: the names of its files and what marks an earlier hf_pruning save."""

    names: set[str] = field(default_factory=set)
    card: str | None = None  # README.md text (undecodable bytes replaced)
    config: dict | None = None  # config.json, when it parses

    @classmethod
    def read(cls, folder: Path) -> FolderState:
        """The state of ``folder`` (empty when it does not exist)."""
        state = cls()
        if not folder.is_dir():
            return state
        state.names = {p.name for p in folder.iterdir() if p.is_file() or p.is_symlink()}
        card = folder / CARD_NAME
        if card.is_file():
            state.card = card.read_bytes().decode("utf-8", errors="replace")
        config = folder / "config.json"
        if config.is_file():
            try:
                loaded = json.loads(config.read_text(encoding="utf-8"))
                state.config = loaded if isinstance(loaded, dict) else None
            except (ValueError, UnicodeDecodeError):
                state.config = None
        return state

    @property
    def generated_card(self) -> bool:
        """The folder's README.md is a card hf_pruning generated."""
        return self.card is not None and is_generated_card(self.card)

    @property
    def saved_by_hf_pruning(self) -> bool:
        """The earlier save was hf_pruning's: its card is generated, or its config carries a pruning plan."""
        config = self.config or {}
        return self.generated_card or "pruning_plan" in config or "hf_pruning_version" in config


def _weight_group(name: str) -> str | None:
    """The variant of a weight file or weight index name ("" without one), None for any other name."""
    match = _WEIGHTS.match(name) or _WEIGHTS_INDEX.match(name)
    return None if match is None else (match.group("variant") or "")


def stale_files(before: FolderState, written: set[str]) -> list[str]:
    """Names of files of an earlier save that a save writing ``written`` leaves out of date.

    Only names that a model save writes qualify, and only when this save did not rewrite them:

    - weight files and weight indexes of a variant this save wrote (transformers' rule for shards, extended to
      an old ``model.safetensors`` when the new save is sharded and to an old index when it is not: either would
      be loaded instead of, or mixed with, the new weights);
    - hf_pruning's remote code (``hf_pruning_*.py``, ``configuration_hf_pruning.py``, ``modeling_hf_pruning.py``);
    - a README.md that hf_pruning generated (``card=False``), the pictures that card showed, and the
      ``evaluation.json`` of an earlier hf_pruning save (its numbers describe another model).

    A user's README.md, tokenizer files, notes and anything else are never stale.
    """
    groups = {g for g in map(_weight_group, written) if g is not None}
    stale = set()
    for name in before.names - written:
        group = _weight_group(name)
        if group is not None and group in groups:
            stale.add(name)
        elif _REMOTE_CODE.match(name):
            stale.add(name)
        elif name == CARD_NAME and before.generated_card:
            stale.add(name)
        elif name in PICTURE_NAMES and before.generated_card and f"({name})" in before.card:
            stale.add(name)
        elif name == EVALUATION_NAME and before.saved_by_hf_pruning:
            stale.add(name)
    return sorted(stale)


def remove_dead_staging(folder: Path) -> list[str]:
    """Remove staging folders in ``folder`` left by killed saves on this machine; returns their names.

    A staging folder is removed only when its name is hf_pruning's, its host tag is this machine's and its pid
    is no longer running. Folders left beside the target by older hf_pruning releases (``.<name>.tmp-*``,
    ``.<name>.old-<pid>``) are only reported: one of them may hold the only copy of an earlier save.
    """
    removed = []
    if not folder.is_dir():
        return removed
    mine = host_tag()
    for entry in folder.iterdir():
        match = _STAGING.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        if match.group("host") != mine or _pid_alive(int(match.group("pid"))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
        logger.info("removed %s, left by a save that was killed (process %s)", entry, match.group("pid"))
    try:
        legacy = sorted(p.name for p in folder.parent.iterdir()
                        if p.name.startswith(f".{folder.name}.") and _LEGACY_STAGING.match(p.name) and p.is_dir())
    except OSError:  # an unreadable parent folder: nothing to report
        legacy = []
    if legacy and folder.parent != folder:
        logger.warning("%s holds %s, left by an interrupted save of an older hf_pruning; check and delete them "
                       "by hand (one may hold an earlier save)", folder.parent, ", ".join(legacy))
    return removed


class StagedSave:
    """Context manager: ``stage`` is a fresh folder inside ``target``; :meth:`commit` moves its files into place.

    On an exception (or without a commit) the staging folder is removed, and so are the folders that were
    created for ``target`` when they are still empty; the files already in ``target`` are untouched unless the
    exception came while moving, in which case each file is either the old one or the new one, whole.
    """

    def __init__(self, target: Path):
        self.target = target
        self.stage: Path | None = None
        self.before = FolderState()
        self._created: list[Path] = []

    def __enter__(self) -> StagedSave:
        missing = [p for p in (self.target, *self.target.parents) if not p.exists()]
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            self._created.append(path)
        try:
            remove_dead_staging(self.target)
            self.before = FolderState.read(self.target)
            prefix = f"{STAGING_PREFIX}{os.getpid()}-{host_tag()}-"
            self.stage = Path(tempfile.mkdtemp(prefix=prefix, dir=self.target))
        except BaseException:
            self._remove_created()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
        if exc_type is not None:
            self._remove_created()
        return False

    def _remove_created(self) -> None:
        for path in reversed(self._created):  # deepest first; a folder that is not empty stays
            try:
                path.rmdir()
            except OSError:
                break

    def commit(self, skip: set[str] = frozenset()) -> tuple[list[str], list[str]]:
        """Move every staged file (except the names in ``skip``) into ``target``, then remove stale files.

        Returns ``(written, removed)`` as paths relative to ``target``. Raises ``IsADirectoryError`` before
        moving anything when a staged file would replace a folder.
        """
        files = sorted(p.relative_to(self.stage).as_posix() for p in self.stage.rglob("*")
                       if p.is_file() and p.relative_to(self.stage).as_posix() not in skip)
        for rel in files:
            dest = self.target / rel
            if dest.is_dir() and not dest.is_symlink():
                raise IsADirectoryError(f"cannot write {dest}: a folder of that name is in the way; move it and "
                                        "save again")
        order = [r for r in files if r not in _LAST] + [r for r in _LAST if r in files]
        for rel in order:
            dest = self.target / rel
            if "/" in rel:
                dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.stage / rel, dest)
        written = set(files) | (set(skip) & self.before.names)
        removed = []
        for name in stale_files(self.before, {r for r in written if "/" not in r}):
            path = self.target / name
            if path.is_file() or path.is_symlink():
                path.unlink()
                removed.append(name)
        if removed:
            logger.info("removed files of the earlier save in %s: %s", self.target, ", ".join(removed))
        return order, removed


def portable_tokenizer_config(folder: Path) -> None:
    """Make ``tokenizer_config.json`` name a tokenizer class every supported transformers knows.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"`` for a tokenizer that is just its
    ``tokenizer.json``; transformers 4.x does not know that name and fails. ``PreTrainedTokenizerFast`` is the same
    class in 5.x (an alias) and the matching one in 4.x, which then loads the tokenizer from the tokenizer files
    alone, without reading ``config.json`` (whose ``auto_map`` would make it ask about custom code).
    """
    path = folder / "tokenizer_config.json"
    if not path.is_file() or not (folder / "tokenizer.json").is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config, dict) and config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def clean_evaluation(evaluation) -> dict | None:
    """``evaluation`` as strict JSON: NaN and infinities become ``None`` (JSON ``null``), numpy / torch scalars
    become Python numbers. Raises ``ValueError`` naming the key of a value JSON cannot hold."""
    if evaluation is None:
        return None
    if not isinstance(evaluation, Mapping):
        raise ValueError(f"evaluation must be a dict of measured numbers (e.g. {{'ppl': 12.3}}), got "
                         f"{type(evaluation).__name__}")
    return _clean_value(evaluation, "evaluation")


def _clean_value(value, where: str):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r}; keys must be strings (JSON object keys)")
            out[key] = _clean_value(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_clean_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if hasattr(value, "numel") and hasattr(value, "item"):  # a torch tensor / numpy array of one element
        try:
            if value.numel() == 1:
                return _clean_value(value.item(), where)
        except (TypeError, ValueError):
            pass
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise ValueError(f"{where} is a {type(value).__name__} ({value!r:.60}), which JSON cannot hold; evaluation values "
                     "must be numbers, strings, booleans, None, lists or dicts of those")
