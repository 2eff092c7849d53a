"""Base class of method configurations: typed dataclasses, validated on construction, JSON round-trip."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A method configuration with an impossible or unknown value."""


@dataclass
class PruningConfig:
    """Base of every method's config. The subclass sets ``method`` (its lowercase registry key).

    Fields carry ``metadata={"help": ...}``; the CLI builds its flags from them.
    """

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        """Build the config named by ``data['method']`` (looked up in the registry) or this class."""
        from .registry import get_method

        data = dict(data)
        method = data.pop("method", cls.method)
        target = cls if method == cls.method and cls.method else get_method(method).config_class
        names = {f.name for f in fields(target)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{target.__name__}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        return target(**data)

    def uses_calibration(self) -> bool:
        """False when these settings need no calibration data (e.g. a removal order given up front)."""
        return True

    def replace(self, **changes) -> PruningConfig:
        return dataclasses.replace(self, **changes)


def check_fraction(name: str, value: float, low_open: bool = True, high_open: bool = True) -> None:
    """Raise ConfigError unless ``value`` is a number inside (0, 1) (bounds open or closed as asked)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ConfigError(f"{name} must be a fraction in {lo}0, 1{hi}, got {value!r}")
