"""Model cards written with every save (huggingface_hub ModelCard), the summary behind them, user cards kept."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from tiny_models import ARCHS, tiny_model, tokens

import hf_pruning
from hf_pruning.publish import card as card_module
from hf_pruning.publish.summary import pruning_summary

PLAN = {"ops": [{"op": "drop_mlp", "layer": 2}, {"op": "value_only_attention", "layer": 4},
                {"op": "remove_heads", "layer": 1, "heads": [0, 1]}]}
EVAL = {"ppl": 12.5, "dense_ppl": 10.25, "ppl_text": "test text", "ppl_tokens": 2048,
        "acc": {"piqa": 0.6}, "dense_acc": {"piqa": 0.65}, "acc_retained": 0.923, "prefill_speedup": 1.2}


def _pruned(arch="llama"):
    return hf_pruning.prune_(tiny_model(arch), hf_pruning.PlanConfig(plan=PLAN))


@pytest.mark.parametrize("arch", ARCHS)
def test_summary_counts_against_hand_counts(arch):
    model = tiny_model(arch)
    dense = pruning_summary(model)
    assert dense["params"]["before"] == dense["params"]["after"] == hf_pruning.parameter_count(model)
    assert dense["params_removed_fraction"] == 0 and dense["kv_removed_fraction"] == 0
    n_heads = model.config.num_attention_heads
    n_kv = getattr(model.config, "num_key_value_heads", None) or n_heads
    group = n_heads // n_kv  # remove one whole KV group from layer 1 (uneven removals are zero-padded)
    plan = {"ops": [*PLAN["ops"][:2], {"op": "remove_heads", "layer": 1, "heads": list(range(group))}]}
    predicted = hf_pruning.predicted_decoder_params(model, hf_pruning.api._as_plan(plan))
    pruned = hf_pruning.apply_plan_(model, plan)
    s = pruning_summary(pruned)
    assert s["decoder_params"]["after"] == predicted
    assert s["params"]["after"] == hf_pruning.parameter_count(pruned)
    assert s["attention"] == {"full": 5, "value_only": 1, "none": 0} and s["mlp"] == {"full": 5, "none": 1}
    assert s["q_heads_removed"] == group and s["kv_heads_removed"] == 1
    # KV: one value-only layer of six (no cache) and one KV head of n_kv in layer 1
    assert s["kv_removed_fraction"] == pytest.approx(1 / 6 + (1 / n_kv) / 6)
    width = pruned.config.intermediate_size if arch not in ("opt", "opt_postln") else pruned.config.ffn_dim
    assert [r["mlp_width"] for r in s["per_layer"]] == [width, width, 0, width, width, width]


def test_every_save_writes_a_card_with_metadata(tmp_path):
    model = _pruned()
    model.save_pretrained(tmp_path / "m", evaluation=EVAL, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                          repo_id="someone/tiny-pruned")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"pruned", "hf_pruning", "plan", "custom_code"} <= set(data["tags"])
    metrics = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert metrics == {("test text", "perplexity"): 12.5, ("piqa", "accuracy"): 0.6}
    text = card.text
    assert card_module.is_generated_card(card.content)
    assert 'from_pretrained("someone/tiny-pruned", trust_remote_code=True)' in text
    assert "transformers >= 4.57" in text and "revision=" in text
    assert "| MLP sublayer removed | 0 | 1 | +1 |" in text
    assert "| value-only attention (Q/K removed) | 0 | 1 | +1 |" in text
    assert "| perplexity (test text, 2,048 tokens) | 10.25 | 12.50 |" in text
    assert "| prefill throughput | 1.00x | 1.20x |" in text
    s = pruning_summary(model)
    assert f"| decoder-layer parameters | {s['decoder_params']['before']:,} | {s['decoder_params']['after']:,} |" in text
    assert (tmp_path / "m" / "pruning_map.png").exists() and "(pruning_map.png)" in text
    assert json.loads((tmp_path / "m" / "evaluation.json").read_text()) == EVAL


def test_stock_result_has_no_custom_code_and_a_sparsity_picture(tmp_path):
    model = tiny_model("llama")
    hf_pruning.prune_(model, hf_pruning.MagnitudeConfig(sparsity=0.5))
    model.save_pretrained(tmp_path / "m")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert "custom_code" not in card.data.tags and "magnitude" in card.data.tags
    assert "trust_remote_code" not in card.text.split("With hf_pruning installed")[0]
    assert "zero weights in decoder linears | | 50.0% |" in card.text
    assert (tmp_path / "m" / "sparsity.png").exists() and "(sparsity.png)" in card.text
    assert "Not measured when this card was written" in card.text


def test_a_users_card_is_never_overwritten_but_a_generated_one_is_refreshed(tmp_path):
    model = _pruned()
    path = tmp_path / "m"
    model.save_pretrained(path)
    first = (path / "README.md").read_text()
    hf_pruning.apply_plan_(model, {"ops": [{"op": "drop_mlp", "layer": 3}]})
    model.save_pretrained(path)
    second = (path / "README.md").read_text()
    assert second != first and "| MLP sublayer removed | 0 | 2 | +2 |" in second
    mine = "# My model\n\nHand-written notes.\n"
    (path / "README.md").write_text(mine)
    model.save_pretrained(path, evaluation=EVAL)
    assert (path / "README.md").read_text() == mine
    model.save_pretrained(tmp_path / "explicit", card="---\nlicense: mit\n---\nMine.\n")
    assert (tmp_path / "explicit" / "README.md").read_text() == "---\nlicense: mit\n---\nMine.\n"
    model.save_pretrained(tmp_path / "none", card=False)
    assert not (tmp_path / "none" / "README.md").exists()


def test_template_variables_missing_and_extra(tmp_path):
    model = _pruned()
    template = tmp_path / "t.md"
    template.write_text("---\n{{ card_data }}\n---\n# {{ model_name }} by {{ author }}\n{{ structure_section }}\n")
    with pytest.raises(hf_pruning.CardTemplateError, match="author"):
        hf_pruning.build_card(model, template_path=template)
    card = hf_pruning.build_card(model, template_path=template, author="Ada")
    assert "by Ada" in card.text and "| MLP sublayer removed |" in card.text
    # a save whose card fails leaves nothing behind (the folder is written atomically)
    target = tmp_path / "out"
    original = card_module.TEMPLATE_PATH
    card_module.TEMPLATE_PATH = template
    try:
        with pytest.raises(hf_pruning.CardTemplateError):
            model.save_pretrained(target)
    finally:
        card_module.TEMPLATE_PATH = original
    assert not target.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_packaged_template_uses_only_provided_variables():
    text = card_module.TEMPLATE_PATH.read_text()
    needed = card_module.template_variables(text)
    assert {"card_data", "structure_section", "evaluation_section", "load_section"} <= needed
    hf_pruning.build_card(_pruned())  # raises CardTemplateError if a variable were missing


def test_evaluation_travels_with_the_folder_and_is_dropped_by_new_pruning(tmp_path):
    model = _pruned("qwen2")
    model.save_pretrained(tmp_path / "m", evaluation=EVAL)
    loaded = hf_pruning.from_pretrained(tmp_path / "m")
    assert loaded.hf_pruning_evaluation == EVAL
    loaded.save_pretrained(tmp_path / "again")
    assert "| perplexity (test text, 2,048 tokens) | 10.25 | 12.50 |" in (tmp_path / "again" / "README.md").read_text()
    loaded.apply_plan_({"ops": [{"op": "drop_mlp", "layer": 0}]})
    loaded.save_pretrained(tmp_path / "third")
    assert not (tmp_path / "third" / "evaluation.json").exists()
    assert "Not measured when this card was written" in (tmp_path / "third" / "README.md").read_text()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(hf_pruning.from_pretrained(tmp_path / "third")(x).logits, loaded(x).logits)
