"""Checkpoints saved before the redesign (tests/fixtures/pre_redesign, made by make_pre_redesign.py at
commit 1cd9554) still load: with their own saved code in a fresh process, with today's installed package,
and on the oldest supported transformers. Their plans exercise every op kind, an unfused compensation
(Gemma2's norm target and OPT's post-LN) included.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_pruning
from hf_pruning.publish.verify import reload_in_fresh_process

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pre_redesign"
ARCHS = ("llama", "gemma2", "opt_postln")


def _expected(arch: str) -> dict:
    return load_file(FIXTURES / f"expected-{arch}.safetensors")


@pytest.mark.parametrize("arch", ARCHS)
def test_old_checkpoint_loads_with_todays_package(arch, tmp_path):
    want = _expected(arch)
    model = hf_pruning.from_pretrained(FIXTURES / arch)
    assert type(model).__module__.startswith("hf_pruning.")  # today's classes, not the folder's code
    with torch.no_grad():
        logits = model(want["input_ids"], use_cache=False).logits
    torch.testing.assert_close(logits, want["logits"], rtol=0, atol=1e-5)
    gen = model.generate(want["input_ids"][:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, want["generated"])
    # and it saves again with today's code: the plan round-trips unchanged
    hf_pruning.save_pretrained(model, tmp_path / "again")
    again = hf_pruning.from_pretrained(tmp_path / "again")
    assert hf_pruning.get_plan(again).to_dict() == hf_pruning.get_plan(model).to_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_old_checkpoint_loads_with_its_own_code(arch, tmp_path):
    want = _expected(arch)
    folder = shutil.copytree(FIXTURES / arch, tmp_path / arch)  # the folder stays untouched
    out = reload_in_fresh_process(folder, want["input_ids"], max_new_tokens=6)
    torch.testing.assert_close(out["logits"], want["logits"], rtol=0, atol=1e-5)
    assert torch.equal(out["generated"], want["generated"])


OLD_PYTHON = os.environ.get("HF_PRUNING_OLD_PYTHON")


@pytest.mark.oldtf
@pytest.mark.skipif(not OLD_PYTHON, reason="set HF_PRUNING_OLD_PYTHON (make test builds .venv-tf457 and sets it)")
def test_old_checkpoint_loads_on_oldest_transformers(tmp_path):
    want = _expected("llama")
    folder = shutil.copytree(FIXTURES / "llama", tmp_path / "llama")
    out = reload_in_fresh_process(folder, want["input_ids"], max_new_tokens=6, python=OLD_PYTHON)
    torch.testing.assert_close(out["logits"], want["logits"], rtol=0, atol=1e-4)
    assert torch.equal(out["generated"], want["generated"])
