"""Pruning cost in passes on SmolLM2, this checkout against an earlier revision in the same run
(``python -m benchmarks.passes``; results/passes.{json,md}).

    python -m benchmarks.passes                        # every grid row, HEAD against da4c7d8 (before the engine)
    python -m benchmarks.passes --only sparsegpt gradmap --baseline <rev> --repeats 3

Each row of the benchmark grid (docs/BENCHMARKS: its calibration set; depth rows with compensation fit it on
the main set) is pruned without evaluation, by each side in a fresh process, the sides alternating row by row so
that a busy moment of the machine falls on both. A side's passes are its pruning wall time divided by one
forward over the same tokens measured just before in the same process (``measure_pruning``), so the two sides
are compared at the same thread count and load. The baseline runs from ``git archive <rev>`` (cached in a
temporary folder): its ``hf_pruning`` is imported in place of this checkout's. LoRA recovery rows are left out
(their pruning is another row's) and so is dense. The search's layer forwards, where a method reports them, are
a machine-independent count beside the times.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("benchmarks.passes")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "passes"
PRE_ENGINE = "da4c7d8"  # the last commit before the sequential engine (issue 23's "today")


def rows(only: list[str] | None) -> list[tuple[str, str, dict]]:
    """The grid rows measured: every pruning row (no dense, no recovery), filtered by ``only`` substrings."""
    from .grid import GRID
    from .runner import row_key

    out = [(g, m, st) for g, m, st in GRID if m != "dense" and "recover" not in st]
    return [r for r in out if not only or any(part in row_key(r[1], r[2]) for part in only)]


def side(code: str, group: str, method: str, settings: dict) -> dict:
    """One row pruned by the ``hf_pruning`` found in ``code`` (this process, which has not imported it yet); its
    cost."""
    sys.path.insert(0, code)
    import copy

    import hf_pruning
    from hf_pruning.config import PruningConfig
    from hf_pruning.evaluation import measure_pruning

    from .assets import load_smollm2
    from .grid import BenchSettings

    if not Path(hf_pruning.__file__).resolve().is_relative_to(Path(code).resolve()):
        raise RuntimeError(f"hf_pruning came from {hf_pruning.__file__}, not {code}")
    s = BenchSettings()
    base, tokenizer = load_smollm2()
    main_calib = s.calibration(tokenizer)
    calib = s.calibration(tokenizer, depth=True) if group == "depth" else main_calib
    model = copy.deepcopy(base).eval()
    del base
    config = PruningConfig.from_dict({"method": method, **settings})
    extra = {"compensation_calibration": main_calib} if getattr(config, "compensate", False) else {}
    cost = measure_pruning(lambda: hf_pruning.prune_(model, config, calibration=calib, **extra), model, calib)
    search = (getattr(model, "hf_pruning_report", None) or {}).get("search") or {}
    return {"passes": cost["passes"], "prune_s": cost["prune_s"], "forward_s": cost["forward_s"],
            "search_layer_forwards": search.get("search_layer_forwards"), "hf_pruning": hf_pruning.__file__}


def baseline_code(rev: str) -> str:
    """``git archive rev`` unpacked in a temporary folder (reused within a day's runs)."""
    folder = Path(tempfile.gettempdir()) / f"hf_pruning-{rev}"
    if not (folder / "hf_pruning" / "__init__.py").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
        with tempfile.TemporaryFile() as f:
            f.write(archive)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(folder, filter="data")
    return str(folder)


def run_side(code: str, group: str, method: str, settings: dict, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "benchmarks.passes", "--side", json.dumps([code, group, method, settings]),
           "--side-out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else "failed"}
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def best(runs: list[dict]) -> dict:
    """The run with the fewest passes (the least disturbed by the machine), with every run's passes beside it."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return runs[-1]
    return {**min(done, key=lambda r: r["passes"]), "all_passes": [r["passes"] for r in done]}


def markdown(data: dict) -> str:
    lines = ["# Pruning cost in passes: this checkout against an earlier revision (benchmarks/passes.py)", "",
             f"SmolLM2-135M, the benchmark grid's calibration, {data['threads']} thread(s), sides alternating row by "
             "row in fresh processes, the fewest passes of each row's runs (`all_passes` in the JSON); baseline "
             f"`{data['baseline']}`, now `{data['head']}`, {data['date']}. "
             "Passes: pruning wall time / one forward over the same tokens in the same process. Written by "
             "`python -m benchmarks.passes`; do not edit by hand.", "",
             "| row | passes, baseline | passes, now | now / baseline | layer forwards, baseline | "
             "layer forwards, now |", "|---|---|---|---|---|---|"]
    for key, r in data["rows"].items():
        b, n = r.get("baseline", {}), r.get("now", {})
        ratio = n["passes"] / b["passes"] if "passes" in n and "passes" in b and b["passes"] else None

        def fmt(x, spec="{:.2f}"):
            return "-" if x is None else spec.format(x)

        lines.append(f"| {key} | {fmt(b.get('passes')) if 'error' not in b else 'error'} | "
                     f"{fmt(n.get('passes')) if 'error' not in n else 'error: ' + n['error'][:80]} | {fmt(ratio)} | "
                     f"{fmt(b.get('search_layer_forwards'), '{}')} | {fmt(n.get('search_layer_forwards'), '{}')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.passes", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", default=None, metavar="TEXT", help="rows whose key contains one of these")
    p.add_argument("--baseline", default=PRE_ENGINE, help=f"revision to compare with (default {PRE_ENGINE})")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=1, help="runs per side and row; the fewest passes count")
    p.add_argument("--out", default=str(RESULTS), help="results path without suffix")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--side-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.side:
        Path(args.side_out).write_text(json.dumps(side(*json.loads(args.side))))
        return 0
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    path = Path(args.out).with_suffix(".json")
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(baseline=args.baseline, head=head, threads=args.threads, date=time.strftime("%Y-%m-%d"))
    data.setdefault("rows", {})
    from .runner import row_key

    old = baseline_code(args.baseline)
    for group, method, settings in rows(args.only):
        key = row_key(method, settings)
        logger.info("%s", key)
        runs: dict[str, list[dict]] = {"baseline": [], "now": []}
        for _ in range(args.repeats):  # alternating, so that a busy spell falls on both sides
            runs["baseline"].append(run_side(old, group, method, settings, args.threads))
            runs["now"].append(run_side(str(ROOT), group, method, settings, args.threads))
        data["rows"][key] = {name: best(sides) for name, sides in runs.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
        path.with_suffix(".md").write_text(markdown(data))
    failed = [k for k, r in data["rows"].items() if any("error" in s for s in r.values())]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
