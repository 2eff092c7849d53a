"""The JSONL multiple-choice scorer (hf_pruning/evaluation/choices.py): scores equal a full forward and a full
log-softmax on every architecture and on pruned models, with each context run once and shared through the KV cache
as well as request by request, the lm_head runs only where answer tokens are predicted, accuracies and predictions
equal lm-eval's, JSONL files as tasks, and clear errors for bad files."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from tiny_models import (
    ARCHS,
    BPE_VOCAB,
    NEW_ARCHS,
    _build,
    tiny_bpe_tokenizer,
    tiny_config,
    tiny_model,
    tiny_tokenizer,
)

import hf_pruning
from hf_pruning.evaluation import choices, choices_forward, load_items, score_items, zero_shot, zero_shot_details
from hf_pruning.evaluation.zero_shot import local_task_file, parse_task

SIQA, WIKIHOW = local_task_file("social_iqa"), local_task_file("wikihow_goal_inference")


def bpe_model(arch: str, seed: int = 0):
    """A tiny random model whose vocabulary fits the byte-level tokenizer (sliding windows kept)."""
    config = tiny_config(arch)
    config.vocab_size = BPE_VOCAB
    config._attn_implementation = "eager" if arch == "gemma2" else "sdpa"
    return _build(arch, config, seed)


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe_tokenizer()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def items():
    return load_items(SIQA, 4) + load_items(WIKIHOW, 3)


def reference(model, tokenizer, items):
    """Per item, per choice: one full forward per request, the log-softmax over every position, gathered."""
    out = []
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        ctx = tokenizer.encode(context)
        row = []
        for choice in item["choices"]:
            whole = tokenizer.encode(context + " " + choice)
            assert whole[:len(ctx)] == ctx
            n = len(whole) - len(ctx)
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0]  # [T, V]
            logprobs = torch.log_softmax(logits.float(), dim=-1)[-n:]  # [n, V]
            row.append(float(logprobs.gather(1, torch.tensor(whole[-n:])[:, None]).sum()))
        out.append(row)
    return out


def assert_close(ours, ref, tol=1e-5):
    for a, b in zip(ours, ref, strict=True):
        assert a == pytest.approx(b, abs=tol, rel=tol)


def embedded_tokens(model):
    """A list that collects the [B, T] shape of every forward's input, and the hook's handle."""
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    return shapes, hook


def both_paths(model, tokenizer, items, batch_size):
    """(shared-context scores, per-request scores, tokens each path ran through the model)."""
    out = []
    for shared in (True, False):
        shapes, hook = embedded_tokens(model)
        try:
            lls = choices.choice_loglikelihoods(model, tokenizer, items, batch_size, shared_context=shared)
        finally:
            hook.remove()
        assert all(shape[0] <= batch_size for shape in shapes)  # never more rows than requests a batch
        out.append((lls, sum(shape[0] * shape[1] for shape in shapes)))
    (shared, shared_tokens), (whole, whole_tokens) = out
    return shared, whole, shared_tokens, whole_tokens


@pytest.mark.parametrize("arch", ARCHS + NEW_ARCHS)
def test_scores_equal_a_full_forward_and_log_softmax(arch, bpe, items):
    model = bpe_model(arch)
    assert choices.keep_mode(model) == "mask"  # every supported forward takes a per-row logits_to_keep mask
    if arch == "gemma2":
        assert model.config.final_logit_softcapping  # the soft-capping is part of what is compared
    if arch in ("mistral", "gemma2", "gemma3"):  # contexts are longer than the window: the sliding cache is cut
        assert min(len(bpe.encode(f"Question: {item['question']}")) for item in items) > model.config.sliding_window
    # batches mix items (padding), and split some items' choices across batches
    shared, whole, shared_tokens, whole_tokens = both_paths(model, bpe, items, batch_size=5)
    ref = reference(model, bpe, items)
    assert_close(shared, ref)
    assert_close(whole, ref)
    assert_close(shared, whole)
    assert shared_tokens < 0.7 * whole_tokens  # each context ran once, not once per choice
    assert choice_predictions(items, shared) == choice_predictions(items, whole)


def choice_predictions(items, lls):
    return [choices.predictions(items, lls, metric) for metric in choices.METRICS]


PLANS = {
    "llama": [{"op": "remove_heads", "layer": 1, "heads": [0, 3, 5]}, {"op": "remove_layers", "layers": [4]},
              {"op": "shrink_mlp", "layer": 2, "keep": list(range(0, 96, 2))}],
    "gemma2": [{"op": "drop_attention", "layer": 0}, {"op": "remove_heads", "layer": 3, "heads": [1]},
               {"op": "drop_mlp", "layer": 5}],
    # HARP's value-only attention (no KV cache) next to sliding-window layers
    "mistral": [{"op": "value_only_attention", "layer": 1}, {"op": "value_only_attention", "layer": 4}],
    # removed layers only: the model keeps its stock class, a shorter config and renumbered layers
    "qwen2": [{"op": "remove_layers", "layers": [0, 3]}],
    # uneven heads per layer and a value-only global layer between sliding ones
    "gemma3": [{"op": "remove_heads", "layer": 0, "heads": [0, 2, 5]}, {"op": "remove_heads", "layer": 4, "heads": [7]},
               {"op": "value_only_attention", "layer": 3}, {"op": "remove_layers", "layers": [5]}],
    "opt": [{"op": "value_only_attention", "layer": 0}, {"op": "remove_heads", "layer": 2, "heads": [1, 3]},
            {"op": "remove_layers", "layers": [5]}],
    "qwen3": [{"op": "drop_attention", "layer": 2}, {"op": "remove_heads", "layer": 1, "heads": [4, 6]}],
}


@pytest.mark.parametrize("arch", sorted(PLANS))
def test_scores_of_a_pruned_model_equal_the_reference(arch, bpe, items):
    model = hf_pruning.prune_(bpe_model(arch), hf_pruning.PlanConfig(plan={"ops": PLANS[arch]}))
    assert hf_pruning.parameter_count(model) < hf_pruning.parameter_count(bpe_model(arch))
    shared, whole, shared_tokens, whole_tokens = both_paths(model, bpe, items, batch_size=4)
    ref = reference(model, bpe, items)
    assert_close(shared, ref)
    assert_close(whole, ref)
    assert_close(shared, whole)
    assert shared_tokens < 0.7 * whole_tokens
    assert choice_predictions(items, shared) == choice_predictions(items, whole)


def test_a_saved_and_reloaded_pruned_model_scores_the_same(bpe, items, tmp_path):
    model = hf_pruning.prune_(bpe_model("llama"), hf_pruning.PlanConfig(plan={"ops": PLANS["llama"]}))
    hf_pruning.save_pretrained(model, tmp_path / "pruned")
    reloaded = hf_pruning.from_pretrained(tmp_path / "pruned").eval()
    assert type(reloaded).__name__ == "PrunedLlamaForCausalLM" and choices.keep_mode(reloaded) == "mask"
    assert_close(choices.choice_loglikelihoods(reloaded, bpe, items), choices.choice_loglikelihoods(model, bpe, items))


@pytest.mark.parametrize("mode", ["positions", "full"])
@pytest.mark.parametrize("shared", [True, False])
def test_fallbacks_without_a_mask_give_the_same_scores(mode, shared, bpe, items, monkeypatch):
    model = bpe_model("qwen2")
    masked = choices.choice_loglikelihoods(model, bpe, items, batch_size=4, shared_context=False)
    monkeypatch.setattr(choices, "keep_mode", lambda _model: mode)
    assert_close(choices.choice_loglikelihoods(model, bpe, items, batch_size=4, shared_context=shared), masked)


@pytest.mark.parametrize("shared", [True, False])
def test_the_lm_head_sees_only_positions_that_predict_answer_tokens(shared, bpe, items):
    model = bpe_model("llama")
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    try:
        choices.choice_loglikelihoods(model, bpe, items, batch_size=8, shared_context=shared)
    finally:
        hook.remove()
    reqs = {(tuple(tokens), n) for tokens, n in choices.requests(bpe, items, longest=256)}
    assert all(len(shape) == 2 for shape in rows)  # [N, H]: kept positions only, no [B, T, H]
    contexts = {tokens[:-n] for tokens, n in reqs}
    # shared: each context's last position, projected once, predicts the first answer token of all its choices
    expected = len(contexts) + sum(n - 1 for _, n in reqs) if shared else sum(n for _, n in reqs)
    assert sum(shape[0] for shape in rows) == expected


def test_small_batches_split_an_items_choices_and_identical_choices_tie(bpe):
    items = [{"question": "Where did Tracy go?", "choices": ["home", "to the shop", "home", "out"], "label": 0},
             {"question": "Where did Tracy go?", "choices": ["out", "to a far away town"], "label": 1},
             {"question": "Why?", "choices": ["x", "because it rained all day long"], "label": 0}]
    model = bpe_model("mistral")
    ref = reference(model, bpe, items)
    for batch_size in (1, 2, 3, 16):
        shared, whole, _, _ = both_paths(model, bpe, items, batch_size)
        assert_close(shared, ref)
        assert_close(shared, whole)
        assert shared[0][0] == shared[0][2] and shared[0][3] == shared[1][0]  # one request, one score


def test_contexts_run_once_in_groups_and_continuations_in_chunks_of_the_batch_size():
    reqs = [((1, 2, 3, 9), 1), ((1, 2, 3, 8, 7), 2), ((5, 6), 1), ((5, 7), 1), ((1, 2, 3, 4), 1), ((4, 4, 4, 4), 3)]
    assert choices_forward.context_groups(reqs, batch_size=2) == [
        ([(1, 2, 3), (4,)], [[(((4, 4, 4, 4), 3), 1), (((1, 2, 3, 8, 7), 2), 0)],
                             [(((1, 2, 3, 9), 1), 0), (((1, 2, 3, 4), 1), 0)]]),
        ([(5,)], [[(((5, 6), 1), 0), (((5, 7), 1), 0)]]),
    ]
    groups = choices_forward.context_groups(reqs, batch_size=1)
    assert [len(contexts) for contexts, _ in groups] == [1, 1, 1]
    assert sorted(req for _, chunks in groups for chunk in chunks for req, _ in chunk) == sorted(reqs)


def test_requests_cut_from_the_left_score_the_same_on_both_paths(bpe, items):
    model = bpe_model("opt")  # learned positions: every position below the limit is used
    model.config.max_position_embeddings = 99  # shorter than half the requests: their contexts differ per choice
    reqs = choices.requests(bpe, items, choices.max_length(model, bpe))
    assert max(len(tokens) for tokens, _ in reqs) == 100 > min(len(tokens) for tokens, _ in reqs)
    shared, whole, _, _ = both_paths(model, bpe, items, batch_size=6)
    assert_close(shared, whole)


def test_a_model_whose_cache_cannot_be_shared_is_scored_request_by_request(bpe, items, monkeypatch, caplog):
    model = bpe_model("qwen3")
    whole = choices.choice_loglikelihoods(model, bpe, items, batch_size=4, shared_context=False)
    monkeypatch.setattr(choices, "_PER_REQUEST_MODELS", set())
    monkeypatch.setattr(choices_forward, "DynamicLayer", type("OtherLayer", (), {}))  # the cache's layers are foreign
    with caplog.at_level(logging.DEBUG, logger=choices.__name__):
        for _ in range(2):
            assert choices.choice_loglikelihoods(model, bpe, items, batch_size=4) == whole  # the same requests
    logged = [r.getMessage() for r in caplog.records if "request by request" in r.getMessage()]
    assert len(logged) == 1 and "Qwen3ForCausalLM" in logged[0] and "cannot be shared" in logged[0]
    monkeypatch.setattr(choices_forward, "cache_argument", lambda _model: None)  # a forward without a cache
    monkeypatch.setattr(choices, "_PER_REQUEST_MODELS", set())
    with caplog.at_level(logging.DEBUG, logger=choices.__name__):
        assert choices.choice_loglikelihoods(model, bpe, items, batch_size=4) == whole
    assert any("takes no cache" in r.getMessage() for r in caplog.records)


def test_a_score_that_is_not_finite_on_the_shared_path_is_scored_again_request_by_request(bpe, items, monkeypatch):
    model = bpe_model("gemma2")
    whole = choices.choice_loglikelihoods(model, bpe, items, batch_size=4, shared_context=False)
    leaked = lambda *args: torch.full((len(args[4]) * 40,), float("nan"))  # noqa: E731
    monkeypatch.setattr(choices_forward, "_run_continuations", leaked)
    assert choices.choice_loglikelihoods(model, bpe, items, batch_size=4) == whole


def test_model_mode_is_restored_and_details_are_complete(bpe, items):
    model = bpe_model("opt").train()
    row = score_items(model, bpe, items, "acc_norm", batch_size=3)
    assert model.training
    assert set(row) >= {"acc", "acc_stderr", "n", "metric", "seconds", "predictions", "loglikelihoods"}
    assert row["n"] == len(items) and row["metric"] == "acc_norm"
    hits = sum(p == item["label"] for p, item in zip(row["predictions"], items))
    assert row["acc"] == hits / len(items)
    assert row["acc_stderr"] == pytest.approx(math.sqrt(row["acc"] * (1 - row["acc"]) / (len(items) - 1)))


def test_ties_go_to_the_first_choice_and_acc_norm_divides_by_characters():
    items = [{"question": "q", "choices": ["aa", "b", "cccc"], "label": 0}]
    assert choices.predictions(items, [[-2.0, -3.0, -2.0]], "acc") == [0]
    assert choices.predictions(items, [[-2.0, -3.0, -2.0]], "acc_norm") == [2]  # -2/4 beats -2/2 and -3/1
    assert choices.predictions(items, [[-4.0, -2.0, -8.0]], "acc_norm") == [0]  # -2/1 ties -4/2 and -8/4
    assert math.isnan(choices.binomial_stderr(1.0, 1))


def test_context_spaces_move_to_the_continuation_and_an_empty_context_gets_the_prefix_token(bpe):
    ctx, cont = choices.encode_pair(bpe, "Answer: ", "yes")
    assert ctx == bpe.encode("Answer:") and ctx + cont == bpe.encode("Answer: yes")
    ctx, cont = choices.encode_pair(bpe, "", "yes")
    assert ctx == [bpe.eos_token_id] and cont == bpe.encode("yes")


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_jsonl_files_are_tasks_named_after_their_stem(bpe, items, tmp_path):
    model = bpe_model("mistral")
    path = write_jsonl(tmp_path / "my_items.jsonl", items)
    acc = zero_shot(model, bpe, [str(path), f"{path}:acc_norm", "social_iqa"], limit=4, batch_size=4)
    assert set(acc) == {"my_items", "my_items:acc_norm", "social_iqa"}
    details = zero_shot_details(model, bpe, [str(path)], limit=4)["my_items"]
    assert details["n"] == 4 and details["metric"] == "acc" and details["backend"] == "choices"
    assert details["acc"] == acc["my_items"] == score_items(model, bpe, items[:4], "acc")["acc"]
    assert acc["my_items:acc_norm"] == score_items(model, bpe, items[:4], "acc_norm")["acc"]
    # the embedded task keeps its metric (acc_norm for SIQA); the first items of the file are SIQA's first items
    assert acc["social_iqa"] == acc["my_items:acc_norm"]
    assert parse_task("wikihow_goal_inference").metric == "acc"
    assert parse_task("wikihow_goal_inference:acc_norm").key == "wikihow_goal_inference:acc_norm"
    assert parse_task("hellaswag").path is None and parse_task("hellaswag:acc").lm_eval_name == "hellaswag"


GOOD = {"question": "Which?", "choices": ["a", "b"], "label": 1}


@pytest.mark.parametrize("rows,match", [
    ([{"question": "Which?", "choices": ["a", "b"]}], "lacks the field.*label"),
    ([GOOD, {"question": "Which?", "label": 0}], "item 2 lacks the field.*choices"),
    ([{**GOOD, "label": 2}], "label 2 is not an index into its 2 choices"),
    ([{**GOOD, "label": -1}], "label -1 is not an index"),
    ([{**GOOD, "label": "1"}], "label '1' is not an index"),
    ([{**GOOD, "choices": []}], "choices must be a non-empty list"),
    ([{**GOOD, "choices": ["a", ""]}], "non-empty strings"),
    ([{**GOOD, "question": 3}], "question must be a string"),
    (["", "  "], "no items"),
    (["{not json"], "not a JSON object"),
    (["[1, 2]"], "item 1 is not a JSON object"),
])
def test_bad_jsonl_files_are_clear_errors(rows, match, tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=match):
        zero_shot(tiny_model("llama"), tok, [str(path)], limit=2)


def test_missing_files_repeated_names_and_bad_arguments_are_clear_errors(tok, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(FileNotFoundError, match="task file .*nowhere.jsonl does not exist"):
        zero_shot(model, tok, [str(tmp_path / "nowhere.jsonl")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zero_shot(model, tok, [str(tmp_path / "sub" / "items")])
    copy = write_jsonl(tmp_path / "social_iqa.jsonl", [GOOD])
    with pytest.raises(ValueError, match="asked twice"):
        zero_shot(model, tok, ["social_iqa", str(copy)])
    with pytest.raises(ValueError, match="unknown backend"):
        zero_shot(model, tok, ["social_iqa"], backend="vllm")
    with pytest.raises(ValueError, match="limit must be a positive"):
        zero_shot(model, tok, ["social_iqa"], limit=0)
    with pytest.raises(ValueError, match="unknown metric"):
        score_items(model, tok, [GOOD], "f1")


def assert_same_as_lm_eval(ours: dict, theirs: dict, tol: float) -> None:
    for key, row in ours.items():
        other = theirs[key]
        assert (row["backend"], other["backend"]) == ("choices", "lm-eval")
        assert row["predictions"] == other["predictions"], key
        assert row["acc"] == other["acc"] and row["n"] == other["n"] and row["metric"] == other["metric"]
        assert row["acc_stderr"] == pytest.approx(other["acc_stderr"], rel=1e-9)
        for a, b in zip(row["loglikelihoods"], other["loglikelihoods"], strict=True):
            assert a == pytest.approx(b, abs=tol, rel=tol)


def test_accuracies_and_predictions_equal_lm_eval(tok, tmp_path):
    """The word-level tokenizer maps most words to <unk>: choices tie exactly, and both take the first."""
    pytest.importorskip("lm_eval")
    model = tiny_model("llama")
    path = write_jsonl(tmp_path / "wikihow_part.jsonl", load_items(WIKIHOW, 20))
    tasks = ["social_iqa", f"{path}:acc_norm"]
    ours = zero_shot_details(model, tok, tasks, limit=20, batch_size=8)
    theirs = zero_shot_details(model, tok, tasks, limit=20, batch_size=8, backend="lm-eval")
    assert_same_as_lm_eval(ours, theirs, tol=1e-5)
    assert any(len(set(lls)) < len(lls) for lls in ours["social_iqa"]["loglikelihoods"])  # ties were exercised


@pytest.mark.real
def test_smollm2_agrees_with_lm_eval_item_by_item():
    from benchmarks.assets import load_smollm2

    model, tokenizer = load_smollm2()
    tasks = ["social_iqa", "wikihow_goal_inference"]
    ours = zero_shot_details(model, tokenizer, tasks, limit=40, batch_size=16)
    theirs = zero_shot_details(model, tokenizer, tasks, limit=40, batch_size=16, backend="lm-eval")
    assert_same_as_lm_eval(ours, theirs, tol=1e-3)
