"""FLAP MLP channel pruning: fluctuation-based scores, per-layer standardisation, one global threshold, and a
mean-bias compensation in the down projection. HARP's MLP step, and a width-pruning baseline on its own."""

from .config import FLAPConfig
from .pruner import channel_scores, choose_channels, flap_ops, run_flap, shrink_ops

__all__ = ["FLAPConfig", "channel_scores", "choose_channels", "flap_ops", "run_flap", "shrink_ops"]
