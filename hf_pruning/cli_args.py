"""The command line's argument types: flags built from a config's dataclass fields and the method inputs it
declares, and integer bounds checked while parsing (so a bad value never reaches the model)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing


def at_least(low: int):
    """argparse type: an integer >= ``low`` (checked at parsing, so a bad count never reaches the model)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _field_type(hint):
    """argparse type for a config field annotation (JSON for dicts and lists)."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        hint, origin = args[0], typing.get_origin(args[0])
    if hint in (dict, list) or origin in (dict, list, tuple):
        return json.loads
    return hint if hint in (int, float, str) else str


def add_config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per dataclass field of ``config_cls`` (help from ``field(metadata={"help": ...})``), and the flags
    of the method inputs it declares (:func:`add_input_arguments`)."""
    hints = typing.get_type_hints(config_cls)
    group = parser.add_argument_group(f"{config_cls.method} options ({config_cls.__name__})")
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if hints[f.name] is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=_field_type(hints[f.name]), default=None, help=help_text)
    add_input_arguments(parser, config_cls)


def _input_flag(name: str) -> str:
    """The flag stem of method input ``name``: ``compensation_calibration`` -> ``compensation``."""
    return name.removesuffix("_calibration").replace("_", "-")


def add_input_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """Two flags per method input that ``config_cls`` declares (``inputs``; token ids like the calibration):
    ``--<stem>-samples`` and ``--<stem>-seq-len``, its windows of ``--calib``."""
    for name, used_when in getattr(config_cls, "inputs", {}).items():
        stem = _input_flag(name)
        group = parser.add_argument_group(f"{name} (used with {used_when})")
        group.add_argument(f"--{stem}-samples", type=at_least(1), default=None,
                           help=f"build {name} from this many windows of --calib (default: --n-samples)")
        group.add_argument(f"--{stem}-seq-len", type=at_least(2), default=None,
                           help=f"tokens per {name} window (default: --seq-len)")


def input_windows(config_cls, args, windows) -> dict:
    """The method inputs asked for on the command line, built with ``windows(n_samples, seq_len)``."""
    inputs = {}
    for name in getattr(config_cls, "inputs", {}):
        stem = _input_flag(name).replace("-", "_")
        n_samples, seq_len = getattr(args, f"{stem}_samples", None), getattr(args, f"{stem}_seq_len", None)
        if n_samples or seq_len:
            inputs[name] = windows(n_samples or args.n_samples, seq_len or args.seq_len)
    return inputs


def config_from_args(config_cls, args):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if getattr(args, f.name, None) is not None}
    return config_cls(**values)


def silence_tqdm(cls) -> None:
    """Force ``disable=True`` on every progress bar, also where a library passes ``disable=`` itself."""
    if getattr(cls.__init__, "_hf_pruning_quiet", False):
        return
    original = cls.__init__

    def quiet_init(self, *args, **kwargs):
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    quiet_init._hf_pruning_quiet = True
    cls.__init__ = quiet_init
