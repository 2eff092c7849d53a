"""The maintained peer, llm-compressor (``llmcompressor==0.14.0.1``), pruning beside the benchmark.

``peer_prune`` runs ``benchmarks/peer_llmcompressor.py`` in the peer's own virtualenv (``make peer-deps``:
``~/.cache/hf_pruning/llmcompressor-venv``, or the python named by ``HF_PRUNING_PEER_PYTHON``) and returns its
report and the folder of the pruned model, which the benchmark then evaluates like its own rows.

Fairness rules:

* same token ids: the benchmark's calibration tensor ``[n, T]`` is written as it is and handed to the peer as a
  pre-tokenized dataset (no re-tokenization, no shuffling, no row dropped or cut); the script records the rows
  the model is run on and fails when they are not exactly these.
* the head stays dense, as in ours: the recipe ignores ``re:.*lm_head``. In 0.14 the modifiers reach the head
  under the name ``lm_head.``, so a plain ``"lm_head"`` does not match and the head (with SmolLM2's tied
  embedding) would be pruned silently; the script checks the head and embedding are unchanged.
* only ``oneshot`` is timed: loading the model, building the dataset and saving are outside ``oneshot_s``.
* a dense checkpoint is saved (``save_compressed=False``), reloaded by plain transformers, so both sides'
  models are evaluated by the same code.
* same thread count: the peer runs with the caller's torch threads (``OMP_NUM_THREADS`` and
  ``torch.set_num_threads``) unless ``threads`` says otherwise.
* the peer's own defaults otherwise (SparseGPT block size 128, dampening 0.01); the report records them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PEER_NAME = "llm-compressor"
PEER_SCRIPT = Path(__file__).resolve().with_name("peer_llmcompressor.py")
PEER_VENV = Path.home() / ".cache" / "hf_pruning" / "llmcompressor-venv"
PYTHON_ENV = "HF_PRUNING_PEER_PYTHON"
METHODS = ("sparsegpt", "wanda")
#: left dense by the recipe: the head (see the module docstring for why a regex)
IGNORE = ("re:.*lm_head",)
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
STDERR_TAIL = 3000  # characters of the peer's output quoted in an error


def peer_python() -> str:
    """The peer virtualenv's python: ``$HF_PRUNING_PEER_PYTHON`` or ``~/.cache/hf_pruning/llmcompressor-venv``."""
    return os.environ.get(PYTHON_ENV) or str(PEER_VENV / "bin" / "python")


def target_arguments(settings: dict) -> list[str]:
    """``--sparsity S`` or ``--pattern N:M`` from a grid row's settings (``{"sparsity": 0.5}`` or
    ``{"pattern": "2:4"}``)."""
    unknown = set(settings) - {"sparsity", "pattern"}
    if unknown:
        raise ValueError(f"{PEER_NAME} rows take only 'sparsity' or 'pattern', got {sorted(unknown)}")
    if ("sparsity" in settings) == ("pattern" in settings):
        raise ValueError(f"{PEER_NAME} rows need exactly one of 'sparsity' and 'pattern', got {settings}")
    if "pattern" in settings:
        return ["--pattern", str(settings["pattern"])]
    return ["--sparsity", repr(float(settings["sparsity"]))]


def peer_command(python: str, model_dir: str | os.PathLike, calibration_file: str | os.PathLike, method: str,
                 settings: dict, dtype: torch.dtype, out_dir: str | os.PathLike, report: str | os.PathLike,
                 threads: int) -> list[str]:
    """The command line running the peer script (``-I``: the script's folder stays off ``sys.path``)."""
    if method not in METHODS:
        raise ValueError(f"{PEER_NAME} has no method {method!r}; choose from {METHODS}")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"{PEER_NAME} runs in {sorted(DTYPE_NAMES.values())}, not {dtype}")
    return [python, "-I", str(PEER_SCRIPT), "--model", str(model_dir), "--calibration", str(calibration_file),
            "--method", method, *target_arguments(settings), "--dtype", DTYPE_NAMES[dtype], "--out", str(out_dir),
            "--report", str(report), "--ignore", *IGNORE, "--threads", str(int(threads))]


def peer_env(threads: int) -> dict[str, str]:
    """The caller's environment, offline, with the thread count fixed for OpenMP too."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def peer_prune(model_dir: str | os.PathLike, calibration: torch.Tensor, method: str, settings: dict,
               dtype: torch.dtype, work_dir: str | os.PathLike, python: str | None = None,
               threads: int | None = None) -> dict:
    """Prune ``model_dir`` with llm-compressor's ``method`` on the token ids ``calibration`` ``[n, T]``.

    Writes ``calibration.pt``, ``report.json``, ``peer.log`` and the pruned model (``model/``) under
    ``work_dir``; returns the report (``oneshot_s`` and its CPU seconds ``oneshot_cpu_s``, ``peak_rss_mb`` of the
    peer's process in MiB, the modifier's settings, versions, the row and sparsity checks) plus ``model_dir`` and
    ``prune_s`` (the runner's name for the timed ``oneshot`` call).
    Raises ``FileNotFoundError`` when the peer's python is missing and ``RuntimeError`` when the script fails.
    """
    python = python or peer_python()
    if not Path(python).is_file():
        raise FileNotFoundError(f"{PEER_NAME}'s python {python} not found: run `make peer-deps` (or point "
                                f"{PYTHON_ENV} at a python with llmcompressor installed)")
    if calibration.dim() != 2:
        raise ValueError(f"calibration must be token ids [n, T], got shape {tuple(calibration.shape)}")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    calib_file, report_file, out_dir = work / "calibration.pt", work / "report.json", work / "model"
    torch.save(calibration.detach().to("cpu", torch.int64).contiguous(), calib_file)  # [n, T]
    report_file.unlink(missing_ok=True)  # a report from an earlier run must not pass for this one
    threads = threads or torch.get_num_threads()
    cmd = peer_command(python, model_dir, calib_file, method, settings, dtype, out_dir, report_file, threads)
    logger.info("%s %s %s on %s: %s", PEER_NAME, method, settings, model_dir, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(threads))
    (work / "peer.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode or not report_file.exists():
        raise RuntimeError(f"{PEER_NAME} {method} {settings} failed (exit {proc.returncode}); "
                           f"log {work / 'peer.log'}; its output ends:\n{proc.stderr[-STDERR_TAIL:]}")
    report = json.loads(report_file.read_text())
    return {**report, "prune_s": report["oneshot_s"], "model_dir": str(out_dir)}


if __name__ == "__main__":  # python -m benchmarks.peer MODEL_DIR IDS.pt METHOD SETTINGS_JSON WORK_DIR
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model, ids, meth, sett, folder = sys.argv[1:6]
    result = peer_prune(model, torch.load(ids, weights_only=True), meth, json.loads(sett), torch.float32, folder)
    print(json.dumps({k: result[k] for k in ("oneshot_s", "peak_rss_mb", "checks_passed", "model_dir")}))
