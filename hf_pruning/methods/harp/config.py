"""Configuration of HARP, and the published per-layer scales (presets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...config import ConfigError, PruningConfig, check_fraction

#: the alpha lists of the official driver scripts, as published: LAST layer first. ``layers`` is the model's
#: decoder layer count the list was found for, ``flap_ratio`` the FLAP ratio of the official HARP+FLAP run.
PRESETS: dict[str, dict] = {
    "llama-3.1-8b": {"layers": 32, "alphas": [0.8, 0.2, 0.1, 0.1, 0.0, 0.1, 0.0, 0.0], "flap_ratio": 0.01860},
    "mistral-7b-v0.3": {"layers": 32, "alphas": [0.7, 0.2, 0.2, 0.2, 0.0, 0.0, 0.0, 0.0], "flap_ratio": 0.01488},
    "qwen2-7b": {"layers": 28, "alphas": [0.9, 0.3, 0.3, 0.2], "flap_ratio": 0.00923},
    "gemma2-9b": {"layers": 42, "alphas": [0.5, 0.4, 0.3, 0.4, 0.5, 0.4], "flap_ratio": 0.02042},
}

DEFAULT_GRID = [round(0.1 * i, 1) for i in range(11)]
SEARCHES = ("cached", "naive")


@dataclass
class HARPConfig(PruningConfig):
    """HARP. Which layers: ``num_layers`` (the top N) or ``layers``; their scales: ``alphas`` (one per layer, in
    ascending layer order), a ``preset`` (the published lists) or, when neither is given, the greedy top-down
    search over ``grid`` that minimises calibration perplexity. ``flap_ratio`` / ``flap_match`` add FLAP."""

    method: ClassVar[str] = "harp"
    #: one line for the model card's "Method" section
    card_text: ClassVar[str] = (
        "HARP: in the top layers, queries and keys are removed so each token only passes its own value vector "
        "through the output projection, scaled by a per-layer factor found by a greedy search on calibration "
        "perplexity (a factor of 0 removes the attention sublayer)."
    )
    num_layers: int | None = field(default=None, metadata={"help": "make the top N decoder layers value-only"})
    layers: list[int] | None = field(default=None, metadata={"help": "instead of num_layers: these layer indices"})
    alphas: list[float] | None = field(default=None, metadata={
        "help": "residual scale per chosen layer, in ascending layer order, each in [0, 1] (0 removes the "
                "attention sublayer); default: searched"})
    preset: str | None = field(default=None, metadata={
        "help": "published alphas: llama-3.1-8b, mistral-7b-v0.3, qwen2-7b or gemma2-9b (sets the layers too)"})
    grid: list[float] | None = field(default_factory=lambda: list(DEFAULT_GRID), metadata={
        "help": "alpha values the search tries (default 0.0, 0.1, ..., 1.0)"})
    search: str = field(default="cached", metadata={
        "help": "cached (re-run only the layers from the searched one up; the residual stream below is cached) "
                "or naive (a full forward per grid point); both choose the same alphas"})
    flap_ratio: float | None = field(default=None, metadata={
        "help": "then remove this fraction of all MLP channels with FLAP (the official HARP+FLAP runs)"})
    flap_match: bool = field(default=False, metadata={
        "help": "choose the FLAP amount so that the total matches uniform head pruning at the same KV-cache "
                "reduction: (N/L) of all attention parameters"})
    flap_metric: str = field(default="wifv", metadata={"help": "FLAP score: wifv, ifv or wifn"})

    def __post_init__(self):
        super().__post_init__()  # field types first
        from ..flap.config import METRICS

        chosen = [k for k in ("num_layers", "layers", "preset") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ConfigError(f"HARP needs exactly one of num_layers, layers or preset (got {chosen or 'none'})")
        if self.num_layers is not None and (isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int)
                                            or self.num_layers < 1):
            raise ConfigError(f"num_layers must be a positive integer, got {self.num_layers!r}")
        if self.layers is not None:
            if not self.layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
                raise ConfigError(f"layers must be a non-empty list of layer indices >= 0, got {self.layers!r}")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"layers lists a layer twice: {self.layers}")
            self.layers = sorted(self.layers)
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ConfigError(f"unknown HARP preset {self.preset!r}; known: {', '.join(PRESETS)}")
            if self.alphas is not None:
                raise ConfigError("give either a preset or alphas, not both")
        if self.grid is None:  # "the default grid" (convenient for wrappers that pass every field)
            self.grid = list(DEFAULT_GRID)
        for name, values in (("alphas", self.alphas), ("grid", self.grid)):
            if values is None:
                continue
            bad = [a for a in values if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 <= a <= 1]
            if bad or not values:
                raise ConfigError(f"{name} must be numbers in [0, 1] (a residual scale), got {bad or values}")
        if self.layers is not None and self.alphas is not None and len(self.alphas) != len(self.layers):
            raise ConfigError(f"{len(self.alphas)} alphas for {len(self.layers)} layers; give one per layer")
        if self.num_layers is not None and self.alphas is not None and len(self.alphas) != self.num_layers:
            raise ConfigError(f"{len(self.alphas)} alphas for num_layers={self.num_layers}; give one per layer")
        if self.search not in SEARCHES:
            raise ConfigError(f"search must be one of {SEARCHES}, got {self.search!r}")
        if self.flap_ratio is not None:
            check_fraction("flap_ratio", self.flap_ratio)
            if self.flap_match:
                raise ConfigError("give flap_ratio or flap_match, not both")
        if self.flap_metric not in METRICS:
            raise ConfigError(f"unknown FLAP metric {self.flap_metric!r}; choose one of {', '.join(METRICS)}")

    def uses_calibration(self) -> bool:
        return (self.alphas is None and self.preset is None) or self.flap_ratio is not None or self.flap_match
