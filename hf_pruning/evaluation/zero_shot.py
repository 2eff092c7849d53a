"""Zero-shot multiple choice through lm-evaluation-harness, on an in-memory model (``HFLM``).

The two local tasks (``social_iqa``, ``wikihow_goal_inference``, embedded JSONL, see data/PROVENANCE.md) get
lm-eval task definitions generated into a temporary folder; any other name is passed to lm-eval as is
(its built-in tasks download their data from the Hub).
"""

from __future__ import annotations

import logging
import tempfile
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

LOCAL_TASKS = ("social_iqa", "wikihow_goal_inference")
LOCAL_PREFIX = "hfp_"
#: the accuracy each local task reports: acc_norm where choices differ much in length (SIQA), else acc
LOCAL_METRIC = {"social_iqa": "acc_norm", "wikihow_goal_inference": "acc"}

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


def local_task_file(task: str) -> Path:
    return Path(str(resources.files("hf_pruning").joinpath("data", "tasks", f"{task}.jsonl")))


def _write_task_yamls(folder: Path) -> None:
    for task in LOCAL_TASKS:
        path = local_task_file(task)
        (folder / f"{LOCAL_PREFIX}{task}.yaml").write_text(_TASK_YAML.format(name=LOCAL_PREFIX + task, path=path))


def zero_shot(model, tokenizer, tasks=LOCAL_TASKS, limit: int | None = 300, batch_size: int = 16,
              seed: int = 0) -> dict[str, float]:
    """Accuracy per task, batched through lm-eval. ``limit`` takes the first N items (a fixed subset).

    Local tasks report ``LOCAL_METRIC``; other lm-eval tasks report ``acc_norm`` when present, else ``acc``.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("zero-shot evaluation needs lm-eval: pip install 'hf_pruning[eval]'") from err
    if tokenizer.eos_token_id is None and tokenizer.bos_token_id is None:
        raise ValueError("the tokenizer has neither an EOS nor a BOS token; lm-eval needs one as the context prefix")
    tasks = list(tasks)
    names = [LOCAL_PREFIX + t if t in LOCAL_TASKS else t for t in tasks]
    was_training = model.training
    model.eval()
    with tempfile.TemporaryDirectory(prefix="hf_pruning_tasks_") as folder:
        _write_task_yamls(Path(folder))
        manager = TaskManager(include_path=folder)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise ValueError(
                f"unknown lm-eval task(s) {unknown}; local tasks: {', '.join(LOCAL_TASKS)}; see `lm-eval ls tasks`"
            )
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  device=str(next(model.parameters()).device))
        try:
            out = simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                  verbosity="WARNING", log_samples=False)
        finally:
            model.train(was_training)
    results = {}
    for task, name in zip(tasks, names):
        metrics = out["results"][name]
        metric = LOCAL_METRIC.get(task) or ("acc_norm" if "acc_norm,none" in metrics else "acc")
        results[task] = float(metrics[f"{metric},none"])
    return results
