"""PEFT LoRA trains on a pruned model (targets named explicitly); the merged model saves and reloads."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_save_reload import STRUCTURAL, run_outside
from tiny_models import tiny_model, tokens

import hf_pruning

TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "opt": ["q_proj", "v_proj", "out_proj", "fc2"],
}


@pytest.mark.parametrize("arch", sorted(TARGETS))
def test_lora_on_pruned_model_trains_merges_and_reloads(arch, tmp_path):
    torch.manual_seed(0)
    model = hf_pruning.apply_plan_(tiny_model(arch), STRUCTURAL)
    targets = hf_pruning.lora_target_modules(model, TARGETS[arch])
    assert targets and all(t.rsplit(".", 1)[-1] in TARGETS[arch] for t in targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    x = tokens(batch=4, length=16)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    merged = peft_model.merge_and_unload().eval()
    assert type(merged).__name__.startswith("Pruned")
    hf_pruning.save_pretrained(merged, tmp_path / "merged")
    with torch.no_grad():
        expected = merged(x, use_cache=False).logits
    out = run_outside(tmp_path / "merged", x, tmp_path)
    assert torch.equal(out["logits"], expected)
