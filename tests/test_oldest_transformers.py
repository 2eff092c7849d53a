"""The saved remote code runs on the oldest supported transformers (4.57), in a second virtualenv.

``make test`` builds that virtualenv (.venv-tf457: torch 2.13.0 + transformers 4.57.6) and points
HF_PRUNING_OLD_PYTHON at it. Run directly without it, the test is skipped and says why.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_save_reload import STRUCTURAL
from tiny_models import ARCHS, tiny_model, tokens

import hf_pruning
from hf_pruning.publish.verify import reload_in_fresh_process

pytestmark = pytest.mark.oldtf
OLD_PYTHON = os.environ.get("HF_PRUNING_OLD_PYTHON")


@pytest.mark.skipif(not OLD_PYTHON, reason="set HF_PRUNING_OLD_PYTHON (make test builds .venv-tf457 and sets it)")
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_code_runs_on_oldest_transformers(arch, tmp_path):
    x = tokens()
    dense = tiny_model(arch)
    hf_pruning.save_pretrained(dense, tmp_path / "dense")
    pruned = hf_pruning.apply_plan_(tiny_model(arch), STRUCTURAL)
    hf_pruning.save_pretrained(pruned, tmp_path / "pruned")
    with torch.no_grad():
        dense_logits = dense(x, use_cache=False).logits
        pruned_logits = pruned(x, use_cache=False).logits
    gen = pruned.generate(x[:1], max_new_tokens=6, do_sample=False)
    old_dense = reload_in_fresh_process(tmp_path / "dense", x, python=OLD_PYTHON)
    old = reload_in_fresh_process(tmp_path / "pruned", x, max_new_tokens=6, python=OLD_PYTHON)
    assert old["class"] == type(pruned).__name__
    # the two transformers versions may differ on the dense model itself (Gemma2's eager path: ~1e-4);
    # the pruned model must not differ by more than that
    version_gap = (old_dense["logits"] - dense_logits).abs().max().item()
    assert (old["logits"] - pruned_logits).abs().max().item() <= 2 * version_gap + 1e-5
    assert torch.equal(old["generated"], gen) and torch.equal(old["generated_no_cache"], gen)
