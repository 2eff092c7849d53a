"""The reference model cards in ``model_cards/``: one pruned SmolLM2-135M per method, numbers from the benchmark.

    python -m benchmarks.cards [--results benchmarks/results/smollm2.json] [--out model_cards] [--only NAME,...]

``make cards`` runs it. It rebuilds each reference model from its benchmark row (the same settings and calibration
tokens; searches are replayed from the order or alphas the row recorded, which gives the same model as the
search), checks that the rebuilt model removes exactly what the row measured, saves it to a temporary folder
(which writes the card) and keeps the card and its picture. Every number in a card comes from the results file.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from hf_pruning import PruningConfig, prune_, save_pretrained

from .assets import load_smollm2
from .counts import decoder_nonzero
from .grid import BenchSettings, row_key

logger = logging.getLogger(__name__)

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

#: card name -> (method, the benchmark row's settings)
REFERENCE_ROWS = {
    "magnitude": ("magnitude", {"sparsity": 0.5}),
    "wanda": ("wanda", {"sparsity": 0.5}),
    "sparsegpt": ("sparsegpt", {"sparsity": 0.5}),
    "llm_barber": ("llm_barber", {"init": "wanda", "sparsity": 0.5, "granularity": "output1", "threshold": 0.1}),
    "finercut": ("finercut", {"param_ratio": 0.1333}),
    "shortgpt": ("shortgpt", {"param_ratio": 0.1333}),
    "sleb": ("sleb", {"param_ratio": 0.1333}),
    "taylor": ("taylor", {"param_ratio": 0.1333}),
    "gradmap": ("gradmap", {"param_ratio": 0.1333}),
    "harp": ("harp", {"num_layers": 10}),
    "harp_flap": ("harp", {"num_layers": 10, "flap_match": True}),
    "flap": ("flap", {"param_ratio": 0.0833}),
    "heads": ("heads", {"score": "magnitude", "unit": "group", "per_layer": 1}),
}


def _replay_settings(method: str, settings: dict, report: dict) -> dict:
    """The row's settings plus what its search found, so the rebuild replays instead of searching again."""
    if method in ("finercut", "shortgpt", "sleb", "taylor", "gradmap") and report.get("order"):
        return {**settings, "order": report["order"]}
    if method == "harp" and report.get("alphas") is not None:
        out = {k: v for k, v in settings.items() if k != "num_layers"}
        return {**out, "layers": report["layers"], "alphas": report["alphas"]}
    return settings


def evaluation_from_row(results: dict, row: dict) -> dict:
    """The card's evaluation block from a benchmark row and the results file's dense row and protocol."""
    dense = next(r for r in results["rows"] if r["method"] == "dense" and not r.get("error"))
    ev = results.get("evaluation", {})
    machine = results.get("machine", {})
    return {
        "ppl": row["ppl"], "dense_ppl": dense["ppl"],
        "ppl_text": "Jane Austen, " + " + ".join(ev.get("ppl_text", [])) if ev.get("ppl_text") else None,
        "ppl_tokens": ev.get("ppl_tokens"), "acc": row.get("acc"), "dense_acc": dense.get("acc"),
        "acc_retained": row.get("acc_retained"), "prefill_speedup": row.get("prefill_speedup"),
        "decode_speedup": row.get("decode_speedup"), "ideal_speedup": row.get("ideal_speedup"),
        "note": (f"Measured by `make bench` (benchmarks/results/smollm2.md): perplexity over {ev.get('ppl_tokens')} "
                 f"tokens in windows of {ev.get('ppl_window')}, {ev.get('zero_shot_items')} items per zero-shot task, "
                 f"speed as pruned over dense tokens per second ({ev.get('prefill_tokens')}-token prefill, "
                 f"{ev.get('decode_tokens')}-token decode) on {machine.get('cpus')} CPU cores with torch "
                 f"{machine.get('torch')}; calibration from Jane Austen's "
                 f"{' + '.join(results.get('calibration', {}).get('text', []))}."),
    }


def write_reference_cards(results_path: str | Path = "benchmarks/results/smollm2.json",
                          out_dir: str | Path = "model_cards", only: str | None = None,
                          data_dir: str | None = None) -> list[Path]:
    """Rebuild the reference models of :data:`REFERENCE_ROWS` and write ``out_dir/<name>/README.md`` (+ picture)."""
    results = json.loads(Path(results_path).read_text())
    settings = BenchSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["settings"].items()})
    if data_dir is not None:
        settings.data_dir = data_dir
    names = [n.strip() for n in only.split(",")] if only else list(REFERENCE_ROWS)
    unknown = [n for n in names if n not in REFERENCE_ROWS]
    if unknown:
        raise ValueError(f"no reference card named {unknown}; known: {', '.join(REFERENCE_ROWS)}")
    rows = {r["key"]: r for r in results["rows"] if not r.get("error")}
    base, tokenizer = load_smollm2()
    calib, calib_depth = settings.calibration(tokenizer), settings.calibration(tokenizer, depth=True)
    dense_nonzero = decoder_nonzero(base)
    written = []
    for name in names:
        method, row_settings = REFERENCE_ROWS[name]
        row = rows.get(row_key(method, row_settings))
        if row is None:
            logger.warning("no successful benchmark row %s in %s; card %s skipped", row_key(method, row_settings),
                           results_path, name)
            continue
        config = PruningConfig.from_dict({"method": method,
                                          **_replay_settings(method, row_settings, row.get("report") or {})})
        model = copy.deepcopy(base).eval()
        depth = row.get("group") == "depth"
        # as the benchmark does: depth rows search on the depth tokens and fit any compensation on the main set
        fit_on = {"compensation_calibration": calib} if depth and getattr(config, "compensate", False) else {}
        prune_(model, config, calibration=calib_depth if depth else calib, **fit_on)
        removed = 1 - decoder_nonzero(model) / dense_nonzero
        if abs(removed - row["params_removed"]) > 1e-6:
            raise RuntimeError(f"rebuilt {name} removes {removed:.6f} of decoder parameters but the benchmark row "
                               f"measured {row['params_removed']:.6f}; rerun the benchmark row before the cards")
        folder = Path(out_dir) / name
        with tempfile.TemporaryDirectory(prefix="hf_pruning-card-") as tmp:
            save_pretrained(model, Path(tmp) / "model", evaluation=evaluation_from_row(results, row),
                            repo_id=f"your-name/SmolLM2-135M-Instruct-{name.replace('_', '-')}", base_model=BASE_MODEL)
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            for item in ("README.md", "pruning_map.png", "sparsity.png"):
                if (Path(tmp) / "model" / item).exists():
                    shutil.copy2(Path(tmp) / "model" / item, folder / item)
        written.append(folder / "README.md")
        logger.info("wrote %s (%s, %.1f%% of decoder parameters removed)", folder, method, 100 * removed)
        del model
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cards",
                                     description="regenerate the reference model cards (model_cards/) from benchmark results")
    parser.add_argument("--results", default="benchmarks/results/smollm2.json")
    parser.add_argument("--out", default="model_cards")
    parser.add_argument("--only", default=None, help="comma-separated card names (default: every reference row)")
    parser.add_argument("--data-dir", default=None, help="folder of the Austen novels (default: ../shared/data/austen)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = write_reference_cards(args.results, args.out, only=args.only, data_dir=args.data_dir)
    except (FileNotFoundError, ValueError) as err:  # missing results, texts or weights; an unknown card name
        sys.stderr.write(f"benchmarks.cards: error: {err}\n")
        return 2
    sys.stdout.write("".join(f"{p}\n" for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
