"""Base class of method configurations: typed dataclasses, validated on construction, versioned JSON round-trip."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import reprlib
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar


class ConfigError(ValueError):
    """A method configuration with an impossible or unknown value."""


#: the oldest ``config_version`` a config's JSON form can carry; a record without one is of this version
#: (configs saved before versions existed)
FIRST_CONFIG_VERSION = 1

#: method name -> config class. registry.py installs it on import (this module sits below the registry and
#: does not import it), so that :meth:`PruningConfig.from_dict` can build the class a ``"method"`` key names.
_config_class_of: Callable[[str], type] | None = None


def set_config_class_lookup(lookup: Callable[[str], type]) -> None:
    """Called once by :mod:`hf_pruning.registry`: ``lookup(method)`` returns that method's config class or raises
    ``KeyError`` naming the registered methods."""
    global _config_class_of
    _config_class_of = lookup


@dataclass
class PruningConfig:
    """Base of every method's config. The subclass sets ``method`` (its lowercase registry key).

    Fields carry ``metadata={"help": ...}``; the CLI builds its flags from them. A subclass's ``__post_init__``
    calls ``super().__post_init__()`` first: the types of scalar fields are checked there, generically from the
    annotations (:func:`check_field_types`), so its own checks can compare values without a ``TypeError``.

    ``config_version`` numbers the class's JSON form (:meth:`to_dict` writes it beside ``method``). Raise it
    when a field is added, renamed or changes its meaning, and override :meth:`upgrade_fields` to read the
    older forms; :meth:`from_dict` refuses a form newer than the class (docs/DESIGN-DECISIONS.md, "Configs,
    the registry and method names").
    """

    method: ClassVar[str] = ""
    #: the method's one-line description in a model card's "Method" section
    card_text: ClassVar[str] = ""
    config_version: ClassVar[int] = FIRST_CONFIG_VERSION
    #: data the method takes besides ``calibration``, as keywords of ``prune_``: name -> the settings that use it
    #: (for messages), e.g. ``{"compensation_calibration": "compensate=True"}``; ``prune_`` checks each like
    #: calibration and passes it to the method's ``run`` by keyword
    inputs: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        """Check every field's type against its annotation (subclasses call this first, then check values)."""
        check_field_types(self)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``method``, ``config_version`` and every field (what ``pruning_config`` records)."""
        out: dict[str, Any] = {"method": self.method, "config_version": self.config_version}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        """Build the config that :meth:`to_dict` wrote: the class ``data['method']`` names (looked up in the
        registry; ``KeyError`` for an unknown method) or this class when there is no ``method`` key.

        A form from an older ``config_version`` (or none: configs saved before versions) goes through
        :meth:`upgrade_fields`. A newer one, which this hf_pruning cannot honour, and keys the class does not
        know (a typo) raise :class:`ConfigError`: a config is never built with some of its settings left out.
        """
        data = dict(data)
        method = data.pop("method", cls.method)
        target = cls if method == cls.method and cls.method else _config_class(method)
        version = data.pop("config_version", FIRST_CONFIG_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version < FIRST_CONFIG_VERSION:
            raise ConfigError(f"{target.__name__}: config_version must be an integer >= {FIRST_CONFIG_VERSION}, "
                              f"got {version!r}")
        if version > target.config_version:
            keys = sorted(set(data) - {f.name for f in fields(target)})
            raise ConfigError(
                f"this {method!r} config has config_version {version}, newer than the {target.config_version} this "
                f"hf_pruning reads{f' (settings it does not know: {keys})' if keys else ''}: it was written by a "
                "newer hf_pruning. Upgrade (pip install -U hf_pruning) to use it; or, to run this version's "
                f"{method!r} instead, drop config_version and the settings it does not know"
            )
        data = target.upgrade_fields(data, version)
        names = {f.name for f in fields(target)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{target.__name__}: unknown field(s) {sorted(unknown)}; known: {sorted(names)} (a "
                              "typo? or a setting of a newer hf_pruning: pip install -U hf_pruning)")
        return target(**data)

    @classmethod
    def upgrade_fields(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        """The fields of a form written at ``version`` (older than ``config_version``) in today's form: a class
        that raises its ``config_version`` overrides this (e.g. renames a key). The base returns ``data``."""
        return data

    def uses_calibration(self) -> bool:
        """False when these settings need no calibration data (e.g. a removal order given up front)."""
        return True

    def calibration_required(self, inputs: Collection[str] = ()) -> bool:
        """Whether calibration must be given when the method inputs ``inputs`` (names, see :attr:`inputs`) are:
        whenever these settings use it, unless a subclass lets an input stand in for it."""
        return self.uses_calibration()

    def uses_input(self, name: str) -> bool:
        """Whether these settings use the method input ``name`` (a key of :attr:`inputs`)."""
        return name in self.inputs

    def replace(self, **changes) -> PruningConfig:
        return dataclasses.replace(self, **changes)


def _config_class(method: str) -> type:
    if _config_class_of is None:  # only when this module is used without the package (registry) imported
        raise ConfigError(f"no method registry to look {method!r} up in: import hf_pruning first")
    return _config_class_of(method)


def check_fraction(name: str, value: float, low_open: bool = True, high_open: bool = True) -> None:
    """Raise ConfigError unless ``value`` is a number inside (0, 1) (bounds open or closed as asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"{name} must be a fraction in {lo}0, 1{hi}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(float(value))


#: annotation -> (test, what the message calls it); a float field takes ints and needs a finite value
_SCALARS: dict[type, tuple] = {
    bool: (lambda v: isinstance(v, bool), "true or false (a bool)"),
    int: (_is_int, "an integer"),
    float: (_is_finite_number, "a finite number"),
    str: (lambda v: isinstance(v, (str, os.PathLike)), "a string"),
}


@functools.lru_cache(maxsize=None)
def _field_kinds(cls: type) -> dict[str, tuple[Any, bool, bool]]:
    """Field name -> (scalar type, a list of it, None allowed) for the fields whose annotation is a scalar
    (``int``, ``float``, ``bool``, ``str``) or a list of numbers, optionally ``| None``; other fields are
    left to the class's own checks."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that cannot be resolved: the class checks its own fields
        return {}
    kinds = {}
    for f in fields(cls):
        hint, optional = hints.get(f.name), False
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1:
                continue
            hint, optional = rest[0], True
        is_list = typing.get_origin(hint) is list and len(typing.get_args(hint)) == 1
        scalar = typing.get_args(hint)[0] if is_list else hint
        if scalar in _SCALARS and (not is_list or scalar in (int, float)):
            kinds[f.name] = (scalar, is_list, optional)
    return kinds


def check_field_types(config: Any) -> None:
    """Raise :class:`ConfigError` naming the field, the value and the expected type when a dataclass field
    annotated ``int``, ``float``, ``bool``, ``str`` or ``list[int]``/``list[float]`` (optionally ``| None``)
    holds something else; float fields (and list items) must be finite. NumPy scalars become Python numbers
    and paths become strings (so that the config stays JSON)."""
    owner = type(config).__name__
    for name, (scalar, is_list, optional) in _field_kinds(type(config)).items():
        value = getattr(config, name)
        test, what = _SCALARS[scalar]
        if is_list:
            what = f"a list of {'integers' if scalar is int else 'finite numbers'}"
        if optional:
            what += " or None"
        if value is None:
            if optional:
                continue
            ok = False
        elif is_list:
            ok = isinstance(value, (list, tuple)) and all(test(v) for v in value)
        else:
            ok = test(value)
        if not ok:
            raise ConfigError(f"{owner}: {name} must be {what}, got {reprlib.repr(value)} ({type(value).__name__})")
        if is_list:
            continue
        if isinstance(value, os.PathLike):
            object.__setattr__(config, name, os.fspath(value))
        elif scalar in (int, float) and type(value) not in (int, float):  # numpy / torch scalars
            object.__setattr__(config, name, scalar(value))
