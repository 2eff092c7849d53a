"""Method registry: a method is a config class plus a function that returns a PruningResult."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from .config import set_config_class_lookup
from .plan import PruningPlan

logger = logging.getLogger(__name__)


@dataclass
class PruningResult:
    """What a method decided: structural ops (``plan``; mask methods zero weights in place and return none),
    plus a report for humans."""

    plan: PruningPlan | None = None
    report: dict = field(default_factory=dict)
    #: what ``config.json``'s ``pruning_config`` records (default: the config); e.g. the config plus the order
    #: a search found, so that the record alone reproduces the result
    record: dict | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type
    run: Callable  # (model, config, calibration) -> PruningResult
    needs_calibration: bool = True


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_class: type, needs_calibration: bool = True):
    """Decorator registering ``run(model, config, calibration) -> PruningResult`` under ``name``."""

    def wrap(run: Callable) -> Callable:
        if name in _METHODS and _METHODS[name].run is not run:
            raise ValueError(f"method {name!r} is already registered")
        if getattr(config_class, "method", None) != name:
            raise ValueError(f"{config_class.__name__}.method must be {name!r} to register it under that name")
        _METHODS[name] = MethodSpec(name, config_class, run, needs_calibration)
        return run

    return wrap


def get_method(name_or_config) -> MethodSpec:
    """Look a method up by registry key or by config instance/class, with a clear error."""
    name = name_or_config if isinstance(name_or_config, str) else getattr(name_or_config, "method", None)
    spec = _METHODS.get(name or "")
    if spec is None:
        raise KeyError(f"unknown pruning method {name!r}; registered: {', '.join(sorted(_METHODS)) or '(none)'}")
    return spec


def list_methods() -> list[str]:
    """The registry keys of every registered method, sorted."""
    return sorted(_METHODS)


def check_inputs(config, names) -> None:
    """Refuse method inputs ``names`` (keywords of ``prune_`` beyond ``calibration``) that ``config``'s settings do
    not use (:meth:`PruningConfig.uses_input`), naming the methods that declare each one."""
    for name in names:
        if config.uses_input(name):
            continue
        users = {m: _METHODS[m].config_class.inputs[name] for m in sorted(_METHODS)
                 if name in getattr(_METHODS[m].config_class, "inputs", {})}
        used = (f"{name} is only used by methods {', '.join(users)} with {' or '.join(sorted(set(users.values())))}"
                if users else f"no registered method uses {name}")
        own = config.inputs.get(name)
        raise ValueError(f"{used}; {config.method!r} with these settings does not use it: drop the argument"
                         + (f" or set {own}" if own else ""))


set_config_class_lookup(lambda name: get_method(name).config_class)
