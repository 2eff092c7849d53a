"""Check a saved model the way a downstream user meets it: a fresh process without hf_pruning."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

_SCRIPT = """
import sys, torch
sys.modules["hf_pruning"] = None  # hf_pruning cannot be imported: only the saved remote code is used
from transformers import AutoModelForCausalLM
path, x_path, out_path, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
x = torch.load(x_path)
with torch.no_grad():
    logits = model(x, use_cache=False).logits
    default = model(x).logits  # what users run: the cache on, as the config says
    # incremental decoding: a prefill, then one token at a time through the cache
    split = max(1, x.shape[1] // 2)
    step = model(x[:, :split], use_cache=True)
    cache, steps = step.past_key_values, [step.logits]
    for t in range(split, x.shape[1]):
        step = model(x[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        steps.append(step.logits)
out = {"logits": logits, "logits_default": default, "logits_stepwise": torch.cat(steps, dim=1),
       "class": type(model).__name__}
if new_tokens > 0:
    out["generated"] = model.generate(x[:1], max_new_tokens=new_tokens, do_sample=False)
    out["generated_no_cache"] = model.generate(x[:1], max_new_tokens=new_tokens, do_sample=False, use_cache=False)
torch.save(out, out_path)
"""


def reload_in_fresh_process(path: str | os.PathLike, input_ids: torch.Tensor, max_new_tokens: int = 0,
                            python: str = sys.executable, timeout: float = 600) -> dict:
    """Load ``path`` with ``trust_remote_code=True`` in a new interpreter where hf_pruning is blocked.

    Returns ``{"logits", "logits_default", "logits_stepwise", "class"}`` (logits without the cache, of the default
    forward, and of a prefill followed by one-token steps through the cache) and, when ``max_new_tokens > 0``,
    greedy generations of the first row with and without the KV cache. Raises RuntimeError with the child's traceback when loading fails.
    """
    with tempfile.TemporaryDirectory(prefix="hf_pruning_reload_") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "reload.py").write_text(textwrap.dedent(_SCRIPT))
        torch.save(input_ids.cpu(), tmp_path / "x.pt")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        proc = subprocess.run(
            [python, str(tmp_path / "reload.py"), str(Path(path).resolve()), str(tmp_path / "x.pt"),
             str(tmp_path / "out.pt"), str(max_new_tokens)],
            capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"reloading {path} in a fresh process failed:\n{proc.stderr[-4000:]}")
        return torch.load(tmp_path / "out.pt")
