"""The configuration of a DeciLM (``nemotron-nas``) checkpoint written by hf_pruning's vLLM export.

Copied next to the exported weights and loaded with ``trust_remote_code=True``: only the configuration is remote
code; the model runs on the serving engine's own DeciLM implementation. Imports only transformers.

``block_configs`` holds one entry per decoder layer, e.g.
``{"attention": {"no_op": false, "n_heads_in_group": 2}, "ffn": {"no_op": false, "intermediate_size": 1280}}``;
engines read them as attributes (``block_configs[i].attention.no_op``), so each entry is a dict whose keys also
read as attributes (and which serialises as plain JSON).
"""

from __future__ import annotations

from transformers import LlamaConfig


class BlockSection(dict):
    """A dict whose keys also read as attributes; a missing key raises ``AttributeError`` (``hasattr`` works)."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return BlockSection(value) if isinstance(value, dict) else value


class DeciLMConfig(LlamaConfig):
    """LLaMA's configuration plus per-layer ``block_configs`` (DeciLM / ``nemotron-nas``)."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [BlockSection(b) for b in (block_configs or [])]
        super().__init__(**kwargs)
