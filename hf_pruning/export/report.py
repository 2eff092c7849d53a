"""What an export wrote (:class:`ExportReport`) and the parameter counts it quotes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ExportReport:
    """What an export wrote: the files, the engine architecture, per-layer shapes, parameter counts and notes."""

    format: str
    path: str
    files: list[str]
    architecture: str
    outtype: str
    layers: list[dict]
    params_written: int  # parameters in the exported files (padding included)
    params_model: int  # parameters of the model in memory
    params_dense: int  # parameters of the unpruned model of the same configuration
    notes: list[str] = field(default_factory=list)
    tokenizer: str = ""
    command: str = ""  # how to run it

    def to_dict(self) -> dict:
        return asdict(self)
