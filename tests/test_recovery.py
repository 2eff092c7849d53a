"""LoRA recovery (PEFT): trains, merges in place, keeps sparsity masks and structure, fails cleanly."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_save_reload import run_outside
from tiny_models import tiny_model, tokens

import hf_pruning
from hf_pruning.recovery import attach_masked_lora, merge_masked_lora_


def _wanda(arch):
    model = tiny_model(arch)
    return hf_pruning.prune_(model, hf_pruning.WandaConfig(sparsity=0.5), calibration=tokens(batch=4, length=32))


def _zero_masks(model):
    targets = hf_pruning.lora_target_modules(model)
    modules = dict(model.named_modules())
    return {n: modules[n].weight != 0 for n in targets}


def _randomize_lora(peft_model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the update a value
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_masked_update_trains_what_merging_produces(arch):
    x = tokens()
    model = _wanda(arch)
    masks = _zero_masks(model)
    peft_model = attach_masked_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(masks)), masks)
    _randomize_lora(peft_model)
    with torch.no_grad():
        trained = peft_model(x, use_cache=False).logits
    merge_masked_lora_(peft_model, model, masks)
    with torch.no_grad():
        merged = model(x, use_cache=False).logits
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
    modules = dict(model.named_modules())
    assert all(torch.equal(modules[n].weight != 0, keep) for n, keep in masks.items())
    # without the mask, PEFT's own merge refills the pruned weights (what the masked path prevents)
    plain = _wanda(arch)
    peft_plain = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules=list(masks)))
    _randomize_lora(peft_plain)
    peft_plain.merge_and_unload()
    assert hf_pruning.sparsity_report(plain)["overall"] < 0.01


def test_recover_keeps_sparsity_and_lowers_the_loss(tmp_path):
    model = _wanda("llama")
    before = hf_pruning.sparsity_report(model)
    x = tokens(batch=8, length=32)
    report = hf_pruning.recover_(model, x, steps=12, lr=1e-2, eval_ids=x[:2])
    assert hf_pruning.sparsity_report(model) == before
    assert report["loss_last"] < report["loss_first"] and report["ppl_after"] < report["ppl_before"]
    assert report["masked_targets"] == report["targets"] == 6 * 7
    assert type(model).__name__ == "LlamaForCausalLM" and all(p.requires_grad for p in model.parameters())
    assert model.config.pruning_config[-1]["method"] == "lora_recovery"
    assert not any("lora" in n for n, _ in model.named_parameters())
    model.save_pretrained(tmp_path / "m")
    assert "lora_recovery" in (tmp_path / "m" / "README.md").read_text()


@pytest.mark.parametrize("arch", ["gemma2", "qwen2", "mistral"])
def test_recover_structurally_pruned_model_and_reload(arch, tmp_path):
    model = hf_pruning.apply_plan_(tiny_model(arch), {"ops": [
        {"op": "value_only_attention", "layer": 5}, {"op": "drop_attention", "layer": 4},
        {"op": "drop_mlp", "layer": 2}, {"op": "remove_heads", "layer": 1, "heads": [0, 1]}]})
    shapes = {n: p.shape for n, p in model.named_parameters()}
    x = tokens(batch=8, length=32)
    report = hf_pruning.recover_(model, x, steps=8, lr=1e-2, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    # Mistral's groups hold 4 heads: removing 2 leaves zero padding heads (zero q rows, zero o columns), which the
    # recovery keeps at zero like any mask; the other tiny models lose a whole group and have no zeros
    padded = 2 if arch == "mistral" else 0
    assert report["masked_targets"] == padded and report["loss_last"] < report["loss_first"]
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    if padded:
        attn = model.model.layers[1].self_attn
        assert int((attn.q_proj.weight == 0).all(dim=1).sum()) == 2 * attn.head_dim  # two padding heads, still zero
    assert type(model).__name__.startswith("Pruned")
    model.eval().save_pretrained(tmp_path / "m")
    with torch.no_grad():
        expected = model(x[:2], use_cache=False).logits
    assert torch.equal(run_outside(tmp_path / "m", x[:2])["logits"], expected)


def test_no_target_and_bad_settings_leave_the_model_unchanged(monkeypatch):
    model = hf_pruning.apply_plan_(tiny_model("llama"), {"ops": [
        {"op": "value_only_attention", "layer": i} for i in range(6)]})
    state = {n: p.clone() for n, p in model.state_dict().items()}
    x = tokens(batch=4, length=16)
    with pytest.raises(hf_pruning.NoTrainableTargetError, match="q_proj"):
        hf_pruning.recover_(model, x, target_modules=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="steps"):
        hf_pruning.recover_(model, x, steps=0)
    with pytest.raises(ValueError, match="tokenizer"):
        hf_pruning.recover_(model, ["some text"])
    bad = torch.full((4, 16), 10_000)  # ids outside the vocabulary: refused before PEFT is attached
    with pytest.raises(hf_pruning.calibration.CalibrationError, match=r"outside \[0, 96\)"):
        hf_pruning.recover_(model, bad, steps=2)

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure in the first training step")

    monkeypatch.setattr(torch.optim.AdamW, "step", fail)  # a failure inside training: adapters removed unmerged
    with pytest.raises(RuntimeError, match="injected"):
        hf_pruning.recover_(model, x, steps=2)
    assert not any("lora" in n for n, _ in model.named_modules())
    assert all(torch.equal(p, state[n]) for n, p in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
