"""The benchmark grid on Qwen2.5-Coder-1.5B-Instruct (``make bench-1.5b``): the SmolLM2 grid's rows at ten times
the scale, in bfloat16, calibrated on Austen and Python code together and evaluated on both.

Decisions (docs/BENCHMARK-1.5B.md has the reasons):

- one calibration set, half Austen rows (Persuasion, Sense and Sensibility) and half code rows (standard library
  modules a-m, :mod:`benchmarks.texts`), so every row is pruned once and evaluated on two held-out texts: Emma
  and Pride and Prejudice, and the standard library modules n-z (windows spread over all of them);
- bfloat16 throughout (these processors run it about 4x faster than float32; the methods keep their own float32 /
  float64 statistics);
- depth budgets of 4 and 7 of the 28 blocks (14.3% and 25% of decoder parameters);
- attention rows matched on the KV cache: one of the two KV groups of every layer (uniform heads) against HARP on
  the top 14 of 28 layers, both -50% KV; HARP's published Qwen2-7B preset (28 layers too) beside them;
- fewer evaluation tokens and zero-shot items than on SmolLM2 (a row costs about ten times more), written in the
  results' settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_pruning.calibration import build_calibration, evaluation_windows

from .grid import (
    BARBER_SETTINGS,
    BARBER_SETTINGS_NM,
    CALIBRATION_BOOKS,
    EVALUATION_BOOKS,
    PEER_ROWS,
    BenchSettings,
    books,
)
from .texts import code_source, spread_windows, stdlib_code

#: 4 and 7 of the 28 blocks
QWEN_DEPTH_RATIOS = (0.1429, 0.25)
#: HARP on the top 14 of 28 layers: -50% KV cache, as one of the two KV groups per layer
QWEN_HARP_LAYERS = 14
#: LoRA recovery on the 1.5B model: half the SmolLM2 steps (a step costs about ten times more)
QWEN_RECOVERY = {"steps": 50, "batch_size": 4, "seq_len": 256, "lr": 3e-4, "r": 8, "lora_alpha": 16}

_FINERCUT = {"cost_aware": True, "search": "fast"}
#: in the order the rows run (the most telling comparisons first, so that a partial run already answers them)
QWEN_GRID: list[tuple[str, str, dict]] = [
    ("reference", "dense", {}),
    *[row for st in ({"sparsity": 0.5}, {"pattern": "2:4"}) for row in (
        ("unstructured", "wanda", st), ("unstructured", "sparsegpt", st), *[r for r in PEER_ROWS if r[2] == st])],
    *[row for r in QWEN_DEPTH_RATIOS for row in (
        ("depth", "sleb", {"param_ratio": r}), ("depth", "gradmap", {"param_ratio": r}),
        ("depth", "finercut", {"param_ratio": r, **_FINERCUT}),
        ("depth", "shortgpt", {"param_ratio": r}), ("depth", "taylor", {"param_ratio": r}))],
    ("attention", "harp", {"num_layers": QWEN_HARP_LAYERS}),
    ("attention", "harp", {"num_layers": QWEN_HARP_LAYERS, "flap_match": True}),
    ("attention", "flap", {"param_ratio": 0.059}),
    *[("attention", "heads", {"score": s, "unit": "group", "per_layer": 1}) for s in ("magnitude", "wanda")],
    ("attention", "harp", {"preset": "qwen2-7b"}),
    *[("unstructured", "llm_barber", {"init": i, "sparsity": 0.5, **BARBER_SETTINGS[i]}) for i in ("sparsegpt", "wanda")],
    *[("unstructured", "llm_barber", {"init": i, "pattern": "2:4", **BARBER_SETTINGS_NM[i]})
      for i in ("sparsegpt", "wanda")],
    *[("depth", "gradmap", {"param_ratio": r, "compensate": False}) for r in QWEN_DEPTH_RATIOS],
    *[("depth", m, {"param_ratio": r, "compensate": True}) for r in QWEN_DEPTH_RATIOS for m in ("shortgpt", "sleb")],
    *[("unstructured", "magnitude", st) for st in ({"sparsity": 0.5}, {"pattern": "2:4"})],
    ("recovery", "gradmap", {"param_ratio": 0.25, "recover": QWEN_RECOVERY}),
    ("recovery", "sparsegpt", {"pattern": "2:4", "recover": QWEN_RECOVERY}),
]


@dataclass
class QwenBenchSettings(BenchSettings):
    """The 1.5B protocol: mixed calibration (half Austen, half code), two evaluation texts, bfloat16."""

    #: 16,384 tokens: more than the widest linear's 8,960 inputs (down_proj), so SparseGPT's Hessians are not singular
    calib_samples: int = 32
    depth_calib_samples: int = 8
    eval_windows: int = 16  # x 512 = 8,192 tokens per text
    zero_shot_limit: int = 100
    prefill_tokens: int = 1024
    decode_tokens: int = 32
    speed_repeats: int = 1
    dtype: str = "bfloat16"
    eval_texts: tuple[str, ...] = ("austen", "code")
    calibration_texts: tuple[str, ...] = field(default=("austen", "code"))

    def calibration(self, tokenizer, depth: bool = False) -> torch.Tensor:
        """Half the rows from the Austen calibration books, half from the calibration modules ``[n, T]``."""
        n, t = (self.depth_calib_samples, self.depth_calib_seq_len) if depth else (self.calib_samples, self.calib_seq_len)
        half = n // 2
        prose = build_calibration(tokenizer, text=books(self.data_dir, CALIBRATION_BOOKS), n_samples=n - half,
                                  seq_len=t, seed=self.seed)
        code = build_calibration(tokenizer, text=stdlib_code("calibration"), n_samples=half, seq_len=t, seed=self.seed)
        return torch.cat([prose, code])  # [n, T]

    def evaluation_sets(self, tokenizer) -> dict[str, torch.Tensor]:
        """Austen's evaluation books (from their start) and the evaluation modules (windows spread over all)."""
        code = evaluation_windows(tokenizer, stdlib_code("evaluation"), self.eval_seq_len)
        return {"austen": evaluation_windows(tokenizer, books(self.data_dir, EVALUATION_BOOKS), self.eval_seq_len,
                                             self.eval_windows),
                "code": spread_windows(code, self.eval_windows)}

    def recovery_text(self) -> str:
        """LoRA recovery trains on the calibration texts: the Austen calibration books and the a-m modules."""
        return books(self.data_dir, CALIBRATION_BOOKS) + "\n\n" + stdlib_code("calibration")

    def describe(self) -> dict:
        return {"code": code_source(), "dtype": self.dtype,
                "calibration_rows": "first half Austen (persuasion, sensesensibility), second half code (stdlib a-m)"}

    @classmethod
    def quick(cls, **kw) -> QwenBenchSettings:
        return cls(calib_samples=8, depth_calib_samples=4, eval_windows=4, zero_shot_limit=32, decode_tokens=16,
                   prefill_tokens=512, **kw)
