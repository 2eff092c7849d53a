"""The llm-compressor peer (benchmarks/peer.py) without its virtualenv: the missing python's error, the command
line (method, target, dtype, the head ignored by regex, threads) and that the peer script's own parser reads it,
the report handed back or the failure's output quoted, and the script's checks on a tiny model."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from tiny_models import tiny_model

import benchmarks.peer as peer
import benchmarks.peer_llmcompressor as script

IDS = torch.arange(2 * 8).reshape(2, 8)  # [n, T]


def command(settings, method="sparsegpt", dtype=torch.float32, threads=3):
    return peer.peer_command("/venv/bin/python", "/models/smol", "/w/calibration.pt", method, settings, dtype,
                             "/w/model", "/w/report.json", threads)


def test_missing_python_names_make_peer_deps(tmp_path):
    with pytest.raises(FileNotFoundError, match="make peer-deps"):
        peer.peer_prune("/models/smol", IDS, "sparsegpt", {"sparsity": 0.5}, torch.float32, tmp_path,
                        python=str(tmp_path / "no-venv" / "bin" / "python"))


def test_peer_python_follows_the_environment(monkeypatch):
    monkeypatch.delenv(peer.PYTHON_ENV, raising=False)
    assert peer.peer_python().endswith("hf_pruning/llmcompressor-venv/bin/python")
    monkeypatch.setenv(peer.PYTHON_ENV, "/elsewhere/bin/python")
    assert peer.peer_python() == "/elsewhere/bin/python"


def test_command_carries_method_target_dtype_ignore_and_threads():
    cmd = command({"sparsity": 0.5}, method="wanda", dtype=torch.bfloat16)
    assert cmd[:3] == ["/venv/bin/python", "-I", str(peer.PEER_SCRIPT)]
    flags = " ".join(cmd[3:])
    for part in ("--method wanda", "--sparsity 0.5", "--dtype bfloat16", "--ignore re:.*lm_head", "--threads 3",
                 "--calibration /w/calibration.pt", "--out /w/model", "--report /w/report.json"):
        assert part in flags
    assert "--pattern 2:4" in " ".join(command({"pattern": "2:4"}))


def test_the_script_parses_the_command():
    args = script.parse_args(command({"pattern": "2:4"}, dtype=torch.float32)[3:])
    assert (args.method, args.pattern, args.sparsity, args.dtype, args.threads) == ("sparsegpt", "2:4", None,
                                                                                    "float32", 3)
    assert args.ignore == ["re:.*lm_head"]
    assert script.sparsity_target(args) == (0.5, "2:4")
    assert script.sparsity_target(script.parse_args(command({"sparsity": 0.5})[3:])) == (0.5, "0:0")


@pytest.mark.parametrize("settings", [{"sparsity": 0.5, "one_pass": False}, {}, {"sparsity": 0.5, "pattern": "2:4"}])
def test_settings_outside_the_peer_are_refused(settings):
    with pytest.raises(ValueError):
        command(settings)


def test_method_and_dtype_outside_the_peer_are_refused():
    with pytest.raises(ValueError, match="magnitude"):
        command({"sparsity": 0.5}, method="magnitude")
    with pytest.raises(ValueError):
        command({"sparsity": 0.5}, dtype=torch.float16)


def fake_run(returncode: int, report: dict | None, seen: list):
    def run(cmd, **kwargs):
        seen.append((cmd, kwargs))
        if report is not None:
            path = cmd[cmd.index("--report") + 1]
            with open(path, "w") as f:
                json.dump(report, f)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr="loading\nTraceback: boom")
    return run


def test_peer_prune_returns_the_report_and_the_model_folder(tmp_path, monkeypatch):
    python = tmp_path / "python"
    python.write_text("")
    seen: list = []
    monkeypatch.setattr(peer.subprocess, "run", fake_run(0, {"oneshot_s": 1.5, "checks_passed": True}, seen))
    out = peer.peer_prune("/models/smol", IDS.int(), "sparsegpt", {"sparsity": 0.5}, torch.float32, tmp_path,
                          python=str(python), threads=2)
    assert out == {"oneshot_s": 1.5, "checks_passed": True, "prune_s": 1.5, "model_dir": str(tmp_path / "model")}
    saved = torch.load(tmp_path / "calibration.pt", weights_only=True)
    assert saved.dtype == torch.int64 and torch.equal(saved, IDS)
    cmd, kwargs = seen[0]
    assert kwargs["env"]["OMP_NUM_THREADS"] == "2" and cmd[cmd.index("--threads") + 1] == "2"


def test_peer_prune_quotes_the_failing_output(tmp_path, monkeypatch):
    python = tmp_path / "python"
    python.write_text("")
    (tmp_path / "report.json").write_text("{}")  # an earlier run's report must not pass for this one
    monkeypatch.setattr(peer.subprocess, "run", fake_run(1, None, []))
    with pytest.raises(RuntimeError, match="boom"):
        peer.peer_prune("/models/smol", IDS, "wanda", {"pattern": "2:4"}, torch.float32, tmp_path, python=str(python))


def test_script_checks_see_sparsity_head_and_rows():
    model = tiny_model("llama").eval()  # tied head
    before = script.head_and_embedding(model)
    recorder = script.RowRecorder(model)
    with torch.no_grad():
        model(IDS)
    assert recorder.summary(IDS)["ok"]
    linears = script.pruned_linears(model, script.IGNORE)
    assert linears and not any("lm_head" in name for name in linears)
    with torch.no_grad():
        for lin in linears.values():  # 2:4, the first two of every four inputs
            lin.weight.view(lin.weight.shape[0], -1, 4)[..., :2] = 0
    checks = script.sparsity_checks(model, before, 0.5, "2:4", script.IGNORE)
    assert checks["sparsity_ok"] and checks["head_untouched"] and checks["nm_violations"] == 0
    with torch.no_grad():
        model.get_output_embeddings().weight[3, 5] += 1.0  # (row 0 is the padding token's, zero already)
    assert not script.sparsity_checks(model, before, 0.5, "0:0", script.IGNORE)["head_untouched"]
    assert script.ignored("lm_head", model.lm_head, ["re:.*lm_head"]) and not script.ignored(
        "lm_head", model.lm_head, ["lm_head"])  # the peer sees the head as "lm_head."
