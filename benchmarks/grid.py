"""The benchmark grid on SmolLM2-135M (rows and their settings) and the protocol's sizes (``BenchSettings``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_pruning.calibration import build_calibration, evaluation_windows, load_text
from hf_pruning.evaluation import LOCAL_TASKS

CALIBRATION_BOOKS = ("persuasion", "sensesensibility")
EVALUATION_BOOKS = ("emma", "prideprejudice")

#: LLM-Barber's group and threshold per initializer (the official scripts' choice for magnitude, chosen on
#: SmolLM2 with the benchmark calibration and perplexity on held-out text, Northanger Abbey, for the others:
#: docs/MASK-METHODS.md lists the settings tried)
BARBER_SETTINGS = {
    "magnitude": {"granularity": "block", "threshold": 0.1},
    "wanda": {"granularity": "output1", "threshold": 0.1},
    "sparsegpt": {"granularity": "block", "threshold": 0.1, "reconstruct": True, "verify": True},
}
BARBER_SETTINGS_NM = {  # N:M allows output1 only
    "magnitude": {"threshold": 0.1},
    "wanda": {"threshold": 0.1},
    "sparsegpt": {"threshold": 0.1, "reconstruct": True, "verify": True},
}

#: parameter budgets of the depth rows (see GRID)
DEPTH_RATIOS = (0.1333, 0.2333)

#: HARP's layer count on SmolLM2 (30 layers, 3 KV groups): KV cache -1/3, like one KV group per layer
HARP_LAYERS = 10

#: the benchmark grid: (group, method, settings). Methods not yet registered have no rows.
GRID: list[tuple[str, str, dict]] = [
    ("reference", "dense", {}),
    *[("unstructured", m, {"sparsity": 0.5}) for m in ("magnitude", "wanda", "sparsegpt")],
    *[("unstructured", m, {"pattern": "2:4"}) for m in ("magnitude", "wanda", "sparsegpt")],
    # the official two-pass flow (statistics from the unpruned layer, then a pass through the pruned one)
    *[("unstructured", m, {"sparsity": 0.5, "one_pass": False}) for m in ("wanda", "sparsegpt")],
    *[("unstructured", "llm_barber", {"init": i, "sparsity": 0.5, **BARBER_SETTINGS[i]}) for i in BARBER_SETTINGS],
    *[("unstructured", "llm_barber", {"init": i, "pattern": "2:4", **BARBER_SETTINGS_NM[i]}) for i in BARBER_SETTINGS_NM],
    # matched budgets: 4 and 7 of SmolLM2's 30 blocks (13.3% / 23.3% of decoder parameters; block methods hit
    # them exactly, FinerCut stops at its first removal reaching them)
    *[("depth", m, {"param_ratio": r}) for r in DEPTH_RATIOS for m in ("finercut", "shortgpt", "sleb", "taylor", "gradmap")],
    ("depth", "finercut", {"sublayer_ratio": 0.25}),  # the paper's ratio; also times the naive and fast searches
    # FinerCut with the cost-aware rule (score increase per freed parameter) at the same parameter budgets
    *[("depth", "finercut", {"param_ratio": r, "cost_aware": True}) for r in DEPTH_RATIOS],
    # GradMAP's stage 1 alone, and its stage 2 after the other block methods
    *[("depth", "gradmap", {"param_ratio": r, "compensate": False}) for r in DEPTH_RATIOS],
    *[("depth", m, {"param_ratio": r, "compensate": True}) for r in DEPTH_RATIOS for m in ("shortgpt", "sleb", "taylor")],
    # HARP on the top 10 of 30 layers removes 1/3 of the KV cache, as one of 3 KV groups per layer does; with
    # FLAP matched, all three remove 1/3 of the attention parameters (8.33% of decoder parameters)
    ("attention", "harp", {"num_layers": HARP_LAYERS}),
    ("attention", "harp", {"num_layers": HARP_LAYERS, "flap_match": True}),
    ("attention", "flap", {"param_ratio": 0.0833}),
    *[("attention", "heads", {"score": s, "unit": "group", "per_layer": 1}) for s in ("magnitude", "wanda")],
]
#: the maintained peer's rows (llm-compressor's oneshot in its own virtualenv, :mod:`benchmarks.peer`), on the same
#: calibration and evaluation tokens as ours
PEER_METHODS = ("llmcompressor_sparsegpt", "llmcompressor_wanda")
PEER_ROWS: list[tuple[str, str, dict]] = [("peer", m, st) for st in ({"sparsity": 0.5}, {"pattern": "2:4"})
                                          for m in PEER_METHODS]
GRID += PEER_ROWS
#: LoRA recovery after pruning (issue: Hub artifacts): settings of ``hf_pruning.recover_`` on the calibration books
RECOVERY = {"steps": 100, "batch_size": 4, "seq_len": 256, "lr": 3e-4, "r": 8, "lora_alpha": 16}
GRID += [  # one structural and one mask row; the pruning part is the same as the depth / unstructured row's
    ("recovery", "shortgpt", {"param_ratio": 0.2333, "recover": RECOVERY}),
    ("recovery", "wanda", {"pattern": "2:4", "recover": RECOVERY}),
]
#: every row carries these (null when not measured, e.g. after an error)
ROW_FIELDS = ("params_removed", "params_removed_total", "kv_removed", "ppl", "ppl_ratio", "acc", "acc_retained",
              "prune_s", "passes", "peak_rss_ratio", "prefill_speedup", "decode_speedup", "ideal_speedup",
              "select_s", "search_layer_forwards", "compensation_passes", "ppl_before_recovery", "recover_s", "error")
QUICK = {("reference", "dense"), ("unstructured", "wanda"), ("depth", "shortgpt"), ("attention", "harp")}


@dataclass
class BenchSettings:
    """Sizes of one benchmark run; the defaults are the published protocol, ``quick()`` the short one."""

    calib_samples: int = 16
    calib_seq_len: int = 512
    # depth searches score a full forward per candidate and step: FinerCut's 10 x 256 tokens, scaled down
    depth_calib_samples: int = 4
    depth_calib_seq_len: int = 128
    eval_windows: int = 32  # x 512 = 16,384 tokens
    eval_seq_len: int = 512
    zero_shot_limit: int = 300
    zero_shot_tasks: tuple[str, ...] = LOCAL_TASKS
    prefill_tokens: int = 2048
    decode_tokens: int = 128
    speed_repeats: int = 3
    seed: int = 0
    data_dir: str = field(default_factory=lambda: os.environ.get("HF_PRUNING_DATA_DIR", "../shared/data/austen"))

    def calibration(self, tokenizer, depth: bool = False) -> torch.Tensor:
        """The benchmark's calibration token ids ``[n, T]`` from the calibration books: the main set, or with
        ``depth`` the depth rows' (same books and seed, fewer and shorter rows)."""
        n, t = (self.depth_calib_samples, self.depth_calib_seq_len) if depth else (self.calib_samples, self.calib_seq_len)
        return build_calibration(tokenizer, text=books(self.data_dir, CALIBRATION_BOOKS), n_samples=n, seq_len=t,
                                 seed=self.seed)

    def evaluation_sets(self, tokenizer) -> dict[str, torch.Tensor]:
        """The perplexity texts, first one first (the table's ``ppl``): the evaluation books' first windows."""
        return {"austen": evaluation_windows(tokenizer, books(self.data_dir, EVALUATION_BOOKS), self.eval_seq_len,
                                             self.eval_windows)}

    def recovery_text(self) -> str:
        """What LoRA recovery trains on: the calibration books (never evaluation text)."""
        return books(self.data_dir, CALIBRATION_BOOKS)

    def describe(self) -> dict:
        """Extra facts for the results file."""
        return {}

    @classmethod
    def quick(cls, **kw) -> BenchSettings:
        return cls(calib_samples=8, eval_windows=8, zero_shot_limit=100, speed_repeats=1, decode_tokens=32,
                   prefill_tokens=1024, **kw)


def books(data_dir: str, names: tuple[str, ...]) -> str:
    """The text of the books ``names`` (``<data_dir>/<name>.txt``), joined by blank lines."""
    folder = Path(data_dir)
    missing = [b for b in names if not (folder / f"{b}.txt").exists()]
    if missing:
        raise FileNotFoundError(
            f"benchmark texts {missing} not found in {folder}; point --data-dir (or HF_PRUNING_DATA_DIR) at the "
            "folder of Jane Austen's novels (shared/data/austen)"
        )
    return "\n\n".join(load_text(folder / f"{b}.txt") for b in names)


def row_key(method: str, settings: dict) -> str:
    """The key of a grid row in the results file: the method and its settings as sorted JSON."""
    return f"{method}:{json.dumps(settings, sort_keys=True)}"
