"""The whole life of a pruned model: prune -> evaluate -> recover -> save -> push (dry run) -> reload.

    python examples/end_to_end.py                                   # ShortGPT, 7 of SmolLM2's 30 blocks
    python examples/end_to_end.py --recovery-steps 60 --repo-id you/smollm2-pruned
    python examples/end_to_end.py --push true --repo-id you/smollm2-pruned   # really upload (needs a token)

1. Prune SmolLM2-135M in place (any registered method; ShortGPT by default because it needs no search).
2. Measure held-out perplexity before and after.
3. Recover with LoRA (PEFT) on the calibration part of the embedded text; masks would be kept, structure is.
4. Save (each file written whole) with a generated model card that quotes the numbers measured here.
5. Push: a dry run by default (the files that would go up, the card included); ``--push true`` uploads.
6. Reload the saved folder in a fresh Python process without hf_pruning and compare its logits.
"""

from __future__ import annotations

import json
import logging

import common
import torch

import hf_pruning
from hf_pruning.calibration import default_text, evaluation_windows
from hf_pruning.evaluation import perplexity
from hf_pruning.publish.verify import reload_in_fresh_process

logger = logging.getLogger("examples.end_to_end")


def main(model=None, tokenizer=None, calibration=None, eval_ids=None, train_ids=None,
         out_dir="outputs/end-to-end", method: str = "shortgpt", settings: dict | None = None,
         recovery_steps: int = 30, recovery_seq_len: int = 256, repo_id: str = "your-name/SmolLM2-135M-Instruct-pruned",
         push: bool = False, n_samples: int = 16, seq_len: int = 512) -> dict:
    """Run the six steps; returns the numbers, the push's file list and whether the reload was identical.

    method, settings: the pruning method and its config fields (default: ShortGPT removing 23.3% of the decoder).
    recovery_steps, recovery_seq_len: LoRA training steps (batch 4) and window length; 0 steps skips recovery.
    repo_id, push: the Hub repository; without push=True nothing leaves the machine.
    """
    if isinstance(settings, str):  # from the command line: --settings '{"sparsity": 0.5}'
        settings = json.loads(settings)
    settings = {"param_ratio": 0.2333} if settings is None and method == "shortgpt" else (settings or {})
    config = hf_pruning.PruningConfig.from_dict({"method": method, **settings})
    model, tokenizer, calibration, eval_ids = common.prepare(model, tokenizer, calibration, eval_ids, config,
                                                             n_samples, seq_len)
    dense_ppl = perplexity(model, eval_ids)
    hf_pruning.prune_(model, config, calibration=calibration)
    pruned_ppl = perplexity(model, eval_ids)
    logger.info("pruned with %s: perplexity %.2f -> %.2f", method, dense_ppl, pruned_ppl)

    recovery = None
    if recovery_steps > 0:
        if train_ids is None:  # the calibration part of the embedded text, never the evaluation part
            train_ids = evaluation_windows(tokenizer, default_text("calibration"), recovery_seq_len)
        recovery = hf_pruning.recover_(model, train_ids, steps=recovery_steps, seq_len=recovery_seq_len,
                                       eval_ids=eval_ids)
        model.eval()
        logger.info("recovered: perplexity %.2f -> %.2f in %.0f s", recovery["ppl_before"], recovery["ppl_after"],
                    recovery["train_s"])
    final_ppl = recovery["ppl_after"] if recovery else pruned_ppl
    evaluation = {"ppl": final_ppl, "dense_ppl": dense_ppl, "ppl_text": "embedded evaluation text",
                  "ppl_tokens": int(eval_ids.numel())}
    if recovery:
        evaluation["ppl_before_recovery"] = pruned_ppl
    hf_pruning.save_pretrained(model, out_dir, tokenizer=tokenizer, evaluation=evaluation, repo_id=repo_id)

    pushed = hf_pruning.push_to_hub(model, repo_id, tokenizer=tokenizer, evaluation=evaluation, dry_run=not push)
    files = pushed["files"] if not push else None
    logger.info("push %s: %s", "done" if push else "dry run", files or getattr(pushed, "commit_url", pushed))

    check_ids = eval_ids[:1, :64]
    with torch.no_grad():
        expected = model(check_ids, use_cache=False).logits
    reloaded = reload_in_fresh_process(out_dir, check_ids)
    identical = torch.equal(reloaded["logits"], expected)
    logger.info("reloaded without hf_pruning as %s: logits identical = %s", reloaded["class"], identical)
    return {"method": method, "dense_ppl": dense_ppl, "pruned_ppl": pruned_ppl, "final_ppl": final_ppl,
            "recovery": recovery and {k: recovery[k] for k in ("loss_first", "loss_last", "train_s", "masked_targets")},
            "out_dir": str(out_dir), "push_files": files, "reloaded_class": reloaded["class"],
            "reload_identical": identical}


if __name__ == "__main__":
    common.cli(main, __doc__)
