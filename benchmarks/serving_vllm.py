"""Run an exported vLLM checkpoint in vLLM's CPU build and compare it with the reference of benchmarks/serving.py.

    <vllm venv>/bin/python benchmarks/serving_vllm.py EXPORT_DIR REFERENCE.npz   -> one JSON line on stdout

Runs in its own virtualenv (vLLM pins its own transformers), so it imports neither hf_pruning nor the benchmarks.
Log-probs: vLLM returns every prompt position's log-probs over the whole vocabulary (``prompt_logprobs=-1``); the
difference is the largest over all of them.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main(folder: str, reference: str) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ref = np.load(reference)
    ids, ref_lp, ref_greedy = ref["ids"].tolist(), ref["log_probs"], ref["greedy"].tolist()
    llm = LLM(folder, trust_remote_code=True, enforce_eager=True, dtype="float32", max_model_len=256, seed=0,
              max_logprobs=-1)
    prompt = TokensPrompt(prompt_token_ids=ids)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=-1, temperature=0.0))[0]
    diffs = []
    for pos, entries in enumerate(out.prompt_logprobs[1:]):  # entry p+1 holds P(token p+1 | tokens <= p)
        for tok, lp in entries.items():
            diffs.append(abs(lp.logprob - ref_lp[pos, tok]))
    greedy = llm.generate([prompt], SamplingParams(max_tokens=len(ref_greedy), temperature=0.0,
                                                    ignore_eos=True))[0].outputs[0].token_ids
    print(json.dumps({"max_abs_logprob_diff": float(max(diffs)), "greedy_equal": list(greedy) == ref_greedy,
                      "compared_entries": len(diffs)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
