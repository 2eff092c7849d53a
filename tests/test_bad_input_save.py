"""Saving never loses a user's files or leaves a broken model: bad targets, killed saves, odd evaluations.

Every failing case checks the exception type and message, that nothing on disk changed and that the model's
weights are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer, tokens

import hf_pruning
from hf_pruning import saving
from hf_pruning.cli import main
from hf_pruning.publish.card import is_generated_card

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STRUCTURAL = {"ops": [{"op": "drop_attention", "layer": 0}, {"op": "drop_mlp", "layer": 2}]}
REMOTE_CODE = ("modeling_hf_pruning.py", "configuration_hf_pruning.py", "hf_pruning_surgery.py")


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` (hidden ones too): content hash and modification time."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def user_files(folder: Path) -> None:
    """Files a user keeps in a model folder, several of them named like what a save writes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "train.py").write_text("print('my training script')\n")  # a .py that hf_pruning did not write
    (folder / "model.backup.safetensors").write_bytes(b"another variant, not this save's")
    (folder / "data").mkdir()
    (folder / "data" / "rows.csv").write_text("a,b\n1,2\n")
    (folder / ".hf_pruning-save-notes").mkdir()  # named like our staging folders, but not one
    (folder / ".hf_pruning-save-notes" / "x.txt").write_text("x")


def assert_user_files_untouched(folder: Path, before: dict) -> None:
    now = snapshot(folder)
    assert {k: now.get(k) for k in before} == before  # same bytes, same modification time


def staging_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if saving._STAGING.match(p.name))


def reload_logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return hf_pruning.from_pretrained(path)(tokens(), use_cache=False).logits


# --------------------------------------------------------------------------------------------------------------
# 1. a save writes its files into the folder and removes only the out-of-date files of an earlier save
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt"])
def test_save_keeps_the_users_files_and_replaces_only_stale_weights(arch, tmp_path):
    target = tmp_path / "p"
    user_files(target)
    mine = snapshot(target)
    model = hf_pruning.apply_plan_(tiny_model(arch), STRUCTURAL)
    with torch.no_grad():
        expected = model(tokens(), use_cache=False).logits

    model.save_pretrained(target, max_shard_size="40KB")  # sharded
    shards = sorted(p.name for p in target.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (target / "model.safetensors.index.json").exists()
    assert not (target / "model.safetensors").exists()
    assert_user_files_untouched(target, mine)
    assert torch.equal(reload_logits(target), expected)

    model.save_pretrained(target)  # one file: the shards and their index are stale
    assert (target / "model.safetensors").exists()
    assert not list(target.glob("model-*-of-*.safetensors")) and not (target / "model.safetensors.index.json").exists()
    assert_user_files_untouched(target, mine)
    assert torch.equal(reload_logits(target), expected)

    model.save_pretrained(target, max_shard_size="60KB")  # sharded again: the single file would shadow the shards
    assert not (target / "model.safetensors").exists() and (target / "model.safetensors.index.json").exists()
    new_shards = sorted(p.name for p in target.glob("model-*-of-*.safetensors"))
    assert len(new_shards) < len(shards)  # the earlier, longer shard series is gone
    assert_user_files_untouched(target, mine)
    assert torch.equal(reload_logits(target), expected)
    assert staging_folders(target) == []


def test_a_users_card_and_files_named_like_ours_are_kept_untouched(tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "README.md").write_bytes("# Mine\n\nLatin-1 bytes: caf\xe9\n".encode("latin-1"))
    (target / "evaluation.json").write_text('{"my": "own numbers"}')
    (target / "sparsity.png").write_bytes(b"my own plot")
    before = snapshot(target)
    model = hf_pruning.apply_plan_(tiny_model("qwen2"), STRUCTURAL)
    model.save_pretrained(target)  # the folder held no hf_pruning save: evaluation.json and the plot are the user's
    assert {k: snapshot(target)[k] for k in before} == before  # not even rewritten (same modification times)
    assert (target / "modeling_hf_pruning.py").exists() and not (target / "pruning_map.png").exists()  # no card, no picture


def test_a_stock_save_over_a_pruned_one_removes_our_code_card_and_numbers(tmp_path):
    target = tmp_path / "m"
    user_files(target)
    mine = snapshot(target)
    hf_pruning.apply_plan_(tiny_model("mistral"), STRUCTURAL).save_pretrained(target, evaluation={"ppl": 9.0})
    assert all((target / name).exists() for name in (*REMOTE_CODE, "README.md", "evaluation.json", "pruning_map.png"))
    hf_pruning.save_pretrained(tiny_model("mistral"), target, card=False)
    left = {p.name for p in target.iterdir()}
    assert not left & {*REMOTE_CODE, "README.md", "evaluation.json", "pruning_map.png"}
    assert not any(n.startswith("hf_pruning_") for n in left)
    assert_user_files_untouched(target, mine)
    loaded = hf_pruning.from_pretrained(target)
    assert type(loaded).__name__ == "MistralForCausalLM" and getattr(loaded, "hf_pruning_evaluation", None) is None


def test_saving_into_the_working_directory_keeps_it(tmp_path, monkeypatch):
    work = tmp_path / "work"
    user_files(work)
    mine = snapshot(work)
    mode = work.stat().st_mode
    monkeypatch.chdir(work)
    model = hf_pruning.apply_plan_(tiny_model("llama"), STRUCTURAL)
    model.save_pretrained(".")
    assert_user_files_untouched(work, mine)
    assert (work / "model.safetensors").exists() and (work / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["work"]  # nothing written beside it
    assert work.stat().st_mode == mode and staging_folders(work) == []  # the folder itself is the same folder


# --------------------------------------------------------------------------------------------------------------
# 2. bad targets fail before anything is written
# --------------------------------------------------------------------------------------------------------------
def test_saving_onto_a_file_is_refused(tmp_path):
    file = tmp_path / "model.bin"
    file.write_text("not a folder")
    before = snapshot(tmp_path)
    model = hf_pruning.apply_plan_(tiny_model("gemma2"), STRUCTURAL)
    state = weights(model)
    with pytest.raises(NotADirectoryError, match=r"model\.bin: it is a file, not a folder\. Pick a folder"):
        model.save_pretrained(file)
    with pytest.raises(NotADirectoryError, match=r"is under .*model\.bin, which is a file"):
        model.save_pretrained(file / "sub")
    with pytest.raises(ValueError, match="must name a folder.*'.'"):
        model.save_pretrained("")
    with pytest.raises(ValueError, match=r"push_to_hub=True is not supported.*model\.push_to_hub\(repo_id\)"):
        model.save_pretrained(tmp_path / "x", push_to_hub=True)
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["model.bin"]
    assert_same_weights(model, state)


def test_a_failing_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    model = hf_pruning.apply_plan_(tiny_model("opt"), STRUCTURAL)
    target = tmp_path / "m"
    user_files(target)
    model.save_pretrained(target)
    before = snapshot(target)
    state = weights(model)

    def boom(*args, **kwargs):
        raise OSError("disk full while writing")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert snapshot(target) == before
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "new" / "deeper")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # the folders it created are gone again
    assert_same_weights(model, state)


def test_a_folder_in_the_way_of_a_file_is_reported_before_anything_moves(tmp_path):
    target = tmp_path / "m"
    (target / "config.json").mkdir(parents=True)
    before = snapshot(target)
    model = hf_pruning.apply_plan_(tiny_model("llama"), STRUCTURAL)
    with pytest.raises(IsADirectoryError, match=r"config\.json: a folder of that name is in the way"):
        model.save_pretrained(target)
    assert snapshot(target) == before and sorted(os.listdir(target)) == ["config.json"]


# --------------------------------------------------------------------------------------------------------------
# 3. staging folders of killed saves are removed by the next save
# --------------------------------------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_staging_folders_of_dead_saves_are_removed_and_nothing_else(tmp_path, caplog):
    target = tmp_path / "m"
    user_files(target)
    tag = saving.host_tag()
    other_host = "0" * 8 if tag != "0" * 8 else "1" * 8
    dead = target / f"{saving.STAGING_PREFIX}{_dead_pid()}-{tag}-abc123"
    alive = target / f"{saving.STAGING_PREFIX}{os.getpid()}-{tag}-def456"  # this process: still saving
    elsewhere = target / f"{saving.STAGING_PREFIX}{_dead_pid()}-{other_host}-ghi789"  # another machine's save
    for folder in (dead, alive, elsewhere):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    legacy = tmp_path / ".m.tmp-k3j2h1"  # beside the target, from an older hf_pruning: reported, never removed
    legacy.mkdir()
    kept = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(f"m/{dead.name}")}
    with caplog.at_level(logging.INFO, logger="hf_pruning.saving"):
        hf_pruning.save_pretrained(tiny_model("qwen2"), target)
    assert not dead.exists() and alive.exists() and elsewhere.exists() and legacy.exists()
    now = snapshot(tmp_path)
    assert {k: now.get(k) for k in kept} == kept
    assert f"removed {dead}" in caplog.text and ".m.tmp-k3j2h1" in caplog.text and "delete them by hand" in caplog.text


_KILLED_SAVE = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import hf_pruning
from hf_pruning.publish import save
from tiny_models import tiny_model

def killed(*args, **kwargs):  # the weights are staged; the process dies before anything moves
    os.kill(os.getpid(), signal.SIGKILL)

save.write_card = killed
hf_pruning.apply_plan_(tiny_model("llama"), {plan!r}).save_pretrained(sys.argv[1])
"""


def test_a_save_killed_mid_way_is_cleaned_up_by_the_next_one(tmp_path):
    target = tmp_path / "m"
    user_files(target)
    mine = snapshot(target)
    model = hf_pruning.apply_plan_(tiny_model("llama"), STRUCTURAL)
    model.save_pretrained(target)
    before = snapshot(target)
    script = tmp_path / "killed_save.py"
    script.write_text(textwrap.dedent(_KILLED_SAVE.format(repo=str(REPO_ROOT), tests=str(TESTS),
                                                          plan={"ops": [{"op": "drop_mlp", "layer": 1}]})))
    proc = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    left = staging_folders(target)
    assert len(left) == 1 and left[0].startswith(f"{saving.STAGING_PREFIX}{proc.pid}-")
    assert (target / left[0] / "model.safetensors").exists()  # what a killed save leaves: a full weight file
    assert {k: v for k, v in snapshot(target).items() if not k.startswith(left[0])} == before  # nothing moved
    model.save_pretrained(target)
    assert staging_folders(target) == []
    assert sorted(snapshot(target)) == sorted(before)
    assert_user_files_untouched(target, {k: v for k, v in before.items() if k in mine})


# --------------------------------------------------------------------------------------------------------------
# 4. the tokenizer of a pruned model loads without custom code and without a prompt
# --------------------------------------------------------------------------------------------------------------
_LOAD_TOKENIZER = """
import builtins, json, sys
prompts = []

def no_prompt(text=""):  # transformers' "Do you wish to run the custom code? [y/N]" would land here
    prompts.append(text)
    raise EOFError("stdin is closed")

builtins.input = no_prompt
sys.modules["hf_pruning"] = None  # a downstream user without hf_pruning
from transformers import AutoTokenizer

out = {{}}
for mode in sys.argv[2:]:
    if mode == "import":  # a user with hf_pruning
        del sys.modules["hf_pruning"]
        sys.path.insert(0, {repo!r})
        import hf_pruning  # noqa: F401
    kwargs = {{"trust_remote_code": False}} if mode == "no_remote_code" else {{}}
    for path in sys.argv[1].split(","):
        seen = len(prompts)
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        out[mode + ":" + path] = {{"ids": tok("the of and zzz")["input_ids"], "prompted": len(prompts) > seen}}
print("RESULT " + json.dumps(out))
"""


def _load_tokenizers(paths: list[Path], modes: list[str], tmp_path: Path, python: str = sys.executable) -> dict:
    script = tmp_path / "load_tokenizer.py"
    script.write_text(textwrap.dedent(_LOAD_TOKENIZER.format(repo=str(REPO_ROOT))))
    proc = subprocess.run([python, str(script), ",".join(map(str, paths)), *modes], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Do you wish to run the custom code" not in proc.stdout + proc.stderr
    return json.loads(proc.stdout.split("RESULT ", 1)[1])


def test_tokenizer_of_a_pruned_model_needs_no_remote_code_and_no_prompt(tmp_path, capsys):
    tok = tiny_tokenizer()
    expected = tok("the of and zzz")["input_ids"]
    api_path = tmp_path / "api"
    hf_pruning.apply_plan_(tiny_model("llama"), {"ops": [{"op": "drop_attention", "layer": 0}]}).save_pretrained(
        api_path, tokenizer=tok)
    # (a Qwen2 base would make transformers 5 swap in its Qwen2Tokenizer, which does not fit the tiny tokenizer)
    hf_pruning.save_pretrained(tiny_model("opt"), tmp_path / "dense", tokenizer=tok)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"ops": [{"op": "drop_attention", "layer": 0}]}))
    cli_path = tmp_path / "cli"
    assert main(["-q", "apply", str(tmp_path / "dense"), str(plan), str(cli_path)]) == 0
    capsys.readouterr()
    for path in (api_path, cli_path):
        assert "auto_map" in json.loads((path / "config.json").read_text())  # it does need custom code itself
        # a class every supported transformers knows (5.x alone knows "TokenizersBackend"), so 4.x reads no
        # config.json, and 5.x loads the same class as before
        assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert "trust_remote_code=False" in (path / "README.md").read_text()  # the card says how to load it
    result = _load_tokenizers([api_path, cli_path], ["no_remote_code", "import"], tmp_path)
    assert len(result) == 4
    for key, row in result.items():
        assert row == {"ids": expected, "prompted": False}, key


@pytest.mark.skipif(not os.environ.get("HF_PRUNING_OLD_PYTHON"), reason="set HF_PRUNING_OLD_PYTHON (transformers 4.57)")
def test_tokenizer_loads_plainly_on_the_oldest_transformers(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "m"
    hf_pruning.apply_plan_(tiny_model("mistral"), STRUCTURAL).save_pretrained(path, tokenizer=tok)
    result = _load_tokenizers([path], ["plain"], tmp_path, python=os.environ["HF_PRUNING_OLD_PYTHON"])
    assert result == {f"plain:{path}": {"ids": tok("the of and zzz")["input_ids"], "prompted": False}}


# --------------------------------------------------------------------------------------------------------------
# 5. no local path in the card
# --------------------------------------------------------------------------------------------------------------
def test_the_card_holds_no_local_path(tmp_path, capsys):
    parent = tmp_path / "private-parent-7f3a"
    model = hf_pruning.apply_plan_(tiny_model("gemma2"), STRUCTURAL)
    model.save_pretrained(parent / "my-model")
    hf_pruning.save_pretrained(tiny_model("llama"), parent / "dense")
    plan = parent / "plan.json"
    plan.write_text(json.dumps(STRUCTURAL))
    assert main(["-q", "apply", str(parent / "dense"), str(plan), str(parent / "cli-model")]) == 0
    capsys.readouterr()
    parts = [part for part in parent.parts if part not in ("/", "tmp")]
    for name in ("my-model", "cli-model"):
        text = (parent / name / "README.md").read_text()
        assert str(parent) not in text and not [part for part in parts if part in text], name
        assert f'from_pretrained("path/to/{name}", trust_remote_code=True)' in text
    model.save_pretrained(parent / "my-model", repo_id="someone/pruned")
    text = (parent / "my-model" / "README.md").read_text()
    assert 'from_pretrained("someone/pruned", trust_remote_code=True)' in text and "path/to" not in text
    card = hf_pruning.build_card(model, location=str(parent / "x"))  # a caller passing a path leaks nothing either
    assert str(parent) not in str(card) and 'from_pretrained("path/to/x"' in str(card)


# --------------------------------------------------------------------------------------------------------------
# 6. evaluation values: NaN / inf are saved as null, anything JSON cannot hold is refused up front
# --------------------------------------------------------------------------------------------------------------
def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_evaluation_numbers_are_saved_as_null(tmp_path):
    model = hf_pruning.apply_plan_(tiny_model("qwen2"), STRUCTURAL)
    ev = {"ppl": float("nan"), "dense_ppl": float("inf"), "acc": {"piqa": float("-inf"), "boolq": 0.5},
          "prefill_speedup": torch.tensor(1.5), "ppl_tokens": torch.tensor(2048)}
    model.save_pretrained(tmp_path / "m", evaluation=ev)
    saved = _strict_json((tmp_path / "m" / "evaluation.json").read_text())
    assert saved == {"ppl": None, "dense_ppl": None, "acc": {"piqa": None, "boolq": 0.5}, "prefill_speedup": 1.5,
                     "ppl_tokens": 2048}
    card = (tmp_path / "m" / "README.md").read_text()
    assert is_generated_card(card) and not re.search(r"\b(nan|inf|infinity)\b", card, flags=re.IGNORECASE)
    assert "| piqa accuracy | - | - |" in card and "| boolq accuracy | - | 0.500 |" in card
    assert "- type: accuracy\n      value: 0.5" in card and "perplexity" not in card.split("---")[1]
    assert hf_pruning.from_pretrained(tmp_path / "m").hf_pruning_evaluation == saved
    hf_pruning.apply_plan_(tiny_model("qwen2"), STRUCTURAL).save_pretrained(tmp_path / "n", evaluation={"ppl": float("nan")})
    assert "No finite number to show" in (tmp_path / "n" / "README.md").read_text()


@pytest.mark.parametrize(("evaluation", "where"), [
    ({"ppl": 12.0, "acc": {"piqa": {0.5, 0.6}}}, r"evaluation\['acc'\]\['piqa'\] is a set"),
    ({"ppl": torch.ones(3)}, r"evaluation\['ppl'\] is a Tensor"),
    ({"ppl": 3.0, 7: 1.0}, r"evaluation has the key 7; keys must be strings"),
    ([("ppl", 3.0)], r"evaluation must be a dict .* got list"),
])
def test_evaluation_json_cannot_hold_is_refused_before_anything_is_written(evaluation, where, tmp_path):
    model = hf_pruning.apply_plan_(tiny_model("llama"), STRUCTURAL)
    model.save_pretrained(tmp_path / "m")
    before = snapshot(tmp_path)
    state = weights(model)
    with pytest.raises(ValueError, match=where):
        model.save_pretrained(tmp_path / "m", evaluation=evaluation)
    with pytest.raises(ValueError, match=where):
        model.save_pretrained(tmp_path / "fresh", evaluation=evaluation)
    assert snapshot(tmp_path) == before and not (tmp_path / "fresh").exists()
    assert_same_weights(model, state)
    assert getattr(model, "hf_pruning_evaluation", None) is None


# --------------------------------------------------------------------------------------------------------------
# CLI: the same rules through hf-prune, and verify says that it runs the folder's code
# --------------------------------------------------------------------------------------------------------------
def test_cli_keeps_the_users_files_and_refuses_a_file_as_out(tmp_path, capsys):
    hf_pruning.save_pretrained(tiny_model("opt"), tmp_path / "dense", tokenizer=tiny_tokenizer())
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(STRUCTURAL))
    out = tmp_path / "out"
    user_files(out)
    mine = snapshot(out)
    assert main(["-q", "apply", str(tmp_path / "dense"), str(plan), str(out)]) == 0
    assert_user_files_untouched(out, mine)
    assert (out / "modeling_hf_pruning.py").exists() and staging_folders(out) == []
    capsys.readouterr()
    file = tmp_path / "out.txt"
    file.write_text("keep me")
    before = snapshot(tmp_path)
    for argv in (["apply", str(tmp_path / "dense"), str(plan), str(file)],
                 ["prune", str(tmp_path / "dense"), str(file), "--method", "plan", "--plan", json.dumps(STRUCTURAL)]):
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err
        assert f"hf-prune: error: cannot save a model into {file}: it is a file, not a folder. Pick a folder" in err
    assert snapshot(tmp_path) == before


def test_verify_help_says_it_runs_the_folders_code(capsys):
    assert main(["verify", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "RUNS THE PYTHON CODE IN THE FOLDER" in text and "trust_remote_code=True" in text
    assert main(["--help"]) == 0
    assert "trust_remote_code=True" in " ".join(capsys.readouterr().out.split())
