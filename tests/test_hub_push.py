"""push_to_hub / hf-prune push against a fake Hub (tests/fakes/hub.py): files, one commit, cards, errors."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

import hf_pruning
from hf_pruning.cli import main
from hf_pruning.publish.card import is_generated_card

TOKEN = "hf_test_token"
REPO = "test-user/tiny-pruned"
PLAN = {"ops": [{"op": "drop_mlp", "layer": 2}, {"op": "value_only_attention", "layer": 4}]}


def _model():
    return hf_pruning.prune_(tiny_model("llama"), hf_pruning.PlanConfig(plan=PLAN))


def _commits(hub, repo=REPO):
    return hub.repos[repo].commits


def test_push_uploads_what_a_save_writes_in_one_commit(hub, tmp_path):
    model = _model()
    info = model.push_to_hub(REPO, token=TOKEN, private=True, endpoint=hub.url, evaluation={"ppl": 9.5})
    files = hub.files(REPO)
    model.save_pretrained(tmp_path / "local", repo_id=REPO, evaluation={"ppl": 9.5})
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    assert sorted(files) == sorted(local)
    for name in ("config.json", "modeling_hf_pruning.py", "configuration_hf_pruning.py", "evaluation.json",
                 "model.safetensors", "README.md"):
        assert files[name] == local[name], name
    assert hub.repos[REPO].private is True
    commits = _commits(hub)
    assert len(commits) == 1 and "pruned with hf_pruning" in commits[0]["message"]
    assert info.oid == commits[0]["oid"]
    card = files["README.md"].decode()
    assert is_generated_card(card) and f'from_pretrained("{REPO}", trust_remote_code=True)' in card
    assert sorted(commits[0]["files"]) == sorted(local) and hub.endpoints == {hub.url}
    # the card is decided before the upload: the README check comes before the single commit
    calls = [method for method, _ in hub.calls]
    assert calls.index("file_exists") < calls.index("upload_folder") and calls.count("upload_folder") == 1


def test_push_to_a_branch_leaves_main_alone(hub):
    _model().push_to_hub(REPO, token=TOKEN, endpoint=hub.url, revision="pruned-v1", commit_message="first cut")
    assert "config.json" in hub.files(REPO, revision="pruned-v1")
    assert hub.files(REPO) == {}
    assert _commits(hub)[0]["revision"] == "pruned-v1" and _commits(hub)[0]["message"] == "first cut"
    info = _model().push_to_hub(REPO, token=TOKEN, endpoint=hub.url, create_pr=True)
    assert info.pr_num == 1 and _commits(hub)[1]["revision"] == "refs/pr/1" and hub.files(REPO) == {}


def test_a_users_card_on_the_hub_is_kept_and_a_generated_one_refreshed(hub):
    mine = b"---\nlicense: mit\n---\n# My pruned model\n"
    hub.seed(REPO, {"README.md": mine})
    _model().push_to_hub(REPO, token=TOKEN, endpoint=hub.url)
    files = hub.files(REPO)
    assert files["README.md"] == mine and "model.safetensors" in files
    assert "README.md" not in _commits(hub)[0]["files"]  # left out of the upload, not re-uploaded as it was
    other = "test-user/generated"
    model = _model()
    model.push_to_hub(other, token=TOKEN, endpoint=hub.url)
    first = hub.files(other)["README.md"]
    model.apply_plan_({"ops": [{"op": "drop_mlp", "layer": 3}]})
    model.push_to_hub(other, token=TOKEN, endpoint=hub.url)
    second = hub.files(other)["README.md"]
    assert second != first and b"| MLP sublayer removed | 0 | 2 | +2 |" in second


def test_bad_input_and_failures_commit_nothing(hub, monkeypatch):
    model = _model()
    with pytest.raises(ValueError, match="not a valid Hub repo id"):
        model.push_to_hub("bad name/with spaces", token=TOKEN, endpoint=hub.url)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(hf_pruning.HubPushError, match="no Hugging Face token"):
        model.push_to_hub(REPO, endpoint=hub.url)
    assert hub.calls == []
    with pytest.raises(hf_pruning.HubPushError, match="nothing was committed"):
        model.push_to_hub(REPO, token="hf_wrong", endpoint=hub.url)
    assert REPO not in hub.repos
    hub.fail_commit = 422  # a status the client does not retry
    with pytest.raises(hf_pruning.HubPushError, match="nothing was committed"):
        model.push_to_hub(REPO, token=TOKEN, endpoint=hub.url)
    assert _commits(hub) == [] and hub.files(REPO) == {}


def test_dry_run_needs_no_token_and_touches_nothing(hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    out = hf_pruning.push_to_hub(_model(), REPO, dry_run=True, endpoint=hub.url)
    assert {"config.json", "model.safetensors", "README.md", "modeling_hf_pruning.py"} <= set(out["files"])
    assert is_generated_card(out["card"]) and REPO in out["card"]
    assert hub.calls == []


def test_cli_push(hub, tmp_path, capsys, monkeypatch):
    _model().save_pretrained(tmp_path / "saved", evaluation={"ppl": 7.25, "dense_ppl": 6.0})
    assert main(["-q", "push", str(tmp_path / "saved"), REPO, "--dry-run"]) == 0
    assert "dry run: would upload" in capsys.readouterr().out and hub.calls == []
    assert main(["-q", "push", str(tmp_path / "saved"), REPO, "--token", TOKEN, "--endpoint", hub.url,
                 "--private"]) == 0
    card = hub.files(REPO)["README.md"].decode()
    assert f'"{REPO}"' in card and "| 6.00 | 7.25 |" in card  # regenerated for the repo, numbers kept
    assert main(["-q", "push", str(tmp_path / "saved"), "not a repo"]) == 2
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["-q", "push", str(tmp_path / "saved"), REPO, "--endpoint", hub.url]) == 1
    assert "no Hugging Face token" in capsys.readouterr().err
