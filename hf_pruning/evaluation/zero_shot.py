"""Zero-shot multiple-choice accuracy of an in-memory model.

A task is one of

- an embedded task name, ``social_iqa`` or ``wikihow_goal_inference`` (JSONL files under data/tasks, see
  data/PROVENANCE.md): scored by ``evaluation.choices``;
- a path to a JSONL file of ``{"question": str, "choices": [str, ...], "label": int}`` objects (a name that ends in
  ``.jsonl`` or holds a path separator): scored by ``evaluation.choices`` too, and named after the file's stem;
- anything else: an lm-evaluation-harness task, run through lm-eval's ``HFLM`` on the model (lm-eval is an optional
  dependency, imported only then; its built-in tasks download their data from the Hub).

A ``:acc`` or ``:acc_norm`` suffix picks the metric a task reports (``wikihow_goal_inference:acc_norm``,
``data/my_items.jsonl:acc_norm``, ``hellaswag:acc``) and stays in the result's key. Without one, embedded tasks
report ``LOCAL_METRIC``, JSONL files ``acc``, lm-eval tasks ``acc_norm`` where they report it, else ``acc``.

``evaluation.choices`` computes what lm-eval computes for the same task definition (``_TASK_YAML``: context
``"Question: {question}\\nAnswer:"``, continuation ``" " + choice``), but projects onto the vocabulary only the
positions that predict answer tokens, which on large vocabularies is many times faster. ``backend="lm-eval"``
sends the embedded and JSONL tasks through lm-eval as well (generated task definitions), to compare the two.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .choices import METRICS, load_items, predictions, prefix_token_id, score_items

logger = logging.getLogger(__name__)

LOCAL_TASKS = ("social_iqa", "wikihow_goal_inference")
LOCAL_PREFIX = "hfp_"
#: the accuracy each local task reports: acc_norm where choices differ much in length (SIQA), else acc
LOCAL_METRIC = {"social_iqa": "acc_norm", "wikihow_goal_inference": "acc"}
#: ``auto``: JSONL tasks (embedded or files) by evaluation.choices, the rest by lm-eval; ``lm-eval``: all by lm-eval
BACKENDS = ("auto", "lm-eval")

_TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
target_delimiter: " "
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@dataclass(frozen=True)
class Task:
    """One requested task: ``key`` names its result, ``lm_eval_name`` its lm-eval task, ``path`` its JSONL file
    (None for an lm-eval task) and ``metric`` what it reports (None: lm-eval's acc_norm where reported, else acc)."""

    key: str
    lm_eval_name: str
    path: Path | None
    metric: str | None


def local_task_file(task: str) -> Path:
    """The embedded JSONL file of a local task."""
    return Path(str(resources.files("hf_pruning").joinpath("data", "tasks", f"{task}.jsonl")))


def parse_task(spec: str) -> Task:
    """Read one task of ``zero_shot``'s list (an embedded name, a JSONL path or an lm-eval name, with an optional
    ``:acc``/``:acc_norm`` suffix). Raises ``FileNotFoundError`` for a JSONL path that does not exist."""
    base, metric = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail in METRICS:
        base, metric = head, tail
    suffix = f":{metric}" if metric else ""
    if base in LOCAL_TASKS:
        return Task(base + suffix, LOCAL_PREFIX + base, local_task_file(base), metric or LOCAL_METRIC[base])
    if base.endswith(".jsonl") or "/" in base or os.sep in base:
        path = Path(base).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"task file {path} does not exist (a task with a path separator or a .jsonl "
                                    "ending is read as a JSONL file)")
        name = LOCAL_PREFIX + "file_" + re.sub(r"\W", "_", path.stem)
        return Task(path.stem + suffix, name, path, metric or "acc")
    return Task(spec, base, None, metric)


def parse_tasks(tasks) -> list[Task]:
    """``parse_task`` over a list (or one string); two tasks with the same result key are an error."""
    specs = [tasks] if isinstance(tasks, str) else list(tasks)
    parsed = [parse_task(spec) for spec in specs]
    keys = [task.key for task in parsed]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"task(s) {repeated} asked twice (JSONL files are named after their stem)")
    return parsed


def zero_shot(model, tokenizer, tasks=LOCAL_TASKS, limit: int | None = 300, batch_size: int = 16,
              seed: int = 0, backend: str = "auto") -> dict[str, float]:
    """Accuracy per task. ``limit`` takes the first N items of each task (a fixed subset); ``batch_size`` counts
    requests (one per choice); ``seed`` seeds lm-eval (the JSONL scorer is deterministic).

    Embedded tasks report ``LOCAL_METRIC``, JSONL files ``acc``, other lm-eval tasks ``acc_norm`` when present, else
    ``acc``; a ``:acc``/``:acc_norm`` suffix overrides (see the module docstring). ``backend="lm-eval"`` runs the
    embedded and JSONL tasks through lm-eval too.
    """
    details = zero_shot_details(model, tokenizer, tasks, limit, batch_size, seed, backend)
    return {key: row["acc"] for key, row in details.items()}


def zero_shot_details(model, tokenizer, tasks=LOCAL_TASKS, limit: int | None = 300, batch_size: int = 16,
                      seed: int = 0, backend: str = "auto") -> dict[str, dict]:
    """Per task (arguments as ``zero_shot``): ``acc`` (the accuracy under ``metric``), ``acc_stderr``
    (sqrt(acc (1 - acc) / (n - 1))), ``n`` (items scored), ``metric``, ``seconds`` and ``backend``; JSONL tasks
    add ``predictions`` (the chosen index per item) and ``loglikelihoods`` (per item, per choice)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items or None, not {limit!r}")
    prefix_token_id(tokenizer)  # both scorers need a BOS or EOS token: fail before any work
    parsed = parse_tasks(tasks)
    items = {task.key: load_items(task.path, limit) for task in parsed if task.path is not None}
    ours = [task for task in parsed if task.path is not None and backend == "auto"]
    results = _lm_eval_details(model, tokenizer, [t for t in parsed if t not in ours], limit, batch_size, seed)
    for task in ours:
        results[task.key] = {**score_items(model, tokenizer, items[task.key], task.metric, batch_size),
                             "backend": "choices"}
    for task in parsed:
        row = results[task.key]
        logger.info("%s: %s %.4f +- %.4f (%d items, %.1f s, %s)", task.key, row["metric"], row["acc"],
                    row["acc_stderr"], row["n"], row["seconds"], row["backend"])
    return {task.key: results[task.key] for task in parsed}


def _write_task_yaml(folder: Path, task: Task) -> None:
    text = _TASK_YAML.format(name=task.lm_eval_name, path=json.dumps(str(task.path.resolve())))
    (folder / f"{task.lm_eval_name}.yaml").write_text(text)


def _lm_eval_details(model, tokenizer, tasks: list[Task], limit: int | None, batch_size: int,
                     seed: int) -> dict[str, dict]:
    """``zero_shot_details`` rows of ``tasks`` through lm-eval, one ``simple_evaluate`` per task (so each is timed);
    JSONL tasks get generated task definitions."""
    if not tasks:
        return {}
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("zero-shot evaluation of lm-eval tasks needs lm-eval: pip install 'hf_pruning[eval]'") \
            from err
    results = {}
    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory(prefix="hf_pruning_tasks_") as folder:
        for task in tasks:
            if task.path is not None:
                _write_task_yaml(Path(folder), task)
        manager = TaskManager(include_path=folder)
        unknown = [task.key for task in tasks if task.lm_eval_name not in manager.all_tasks]
        if unknown:
            raise ValueError(
                f"unknown lm-eval task(s) {unknown}; local tasks: {', '.join(LOCAL_TASKS)} or a .jsonl file; "
                "see `lm-eval ls tasks`"
            )
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  device=str(next(model.parameters()).device))
        try:
            for task in tasks:
                started = time.perf_counter()
                out = simple_evaluate(model=lm, tasks=[task.lm_eval_name], limit=limit, task_manager=manager,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed, verbosity="WARNING", log_samples=True)
                results[task.key] = _lm_eval_row(out, task, time.perf_counter() - started)
        finally:
            model.train(was_training)
    return results


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def _lm_eval_row(out: dict, task: Task, seconds: float) -> dict:
    """A ``zero_shot_details`` row from one ``simple_evaluate`` result."""
    metrics = out["results"][task.lm_eval_name]
    metric = task.metric or ("acc_norm" if "acc_norm,none" in metrics else "acc")
    if f"{metric},none" not in metrics:
        raise ValueError(f"lm-eval task {task.lm_eval_name} reports no {metric} (it reports {sorted(metrics)})")
    row = {"acc": float(metrics[f"{metric},none"]), "acc_stderr": _number(metrics.get(f"{metric}_stderr,none")),
           "n": int(out["n-samples"][task.lm_eval_name]["effective"]), "metric": metric, "seconds": seconds,
           "backend": "lm-eval"}
    if task.path is not None:  # the items are ours: give the same per-item detail as evaluation.choices
        samples = sorted(out["samples"][task.lm_eval_name], key=lambda sample: sample["doc_id"])
        lls = [[float(resp[0]) for resp in sample["filtered_resps"]] for sample in samples]
        row["loglikelihoods"] = lls
        row["predictions"] = predictions([sample["doc"] for sample in samples], lls, metric)
    return row
