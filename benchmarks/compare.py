"""``python -m benchmarks.compare NEW.json [--against benchmarks/results/smollm2.json]``: does a rerun of some
benchmark rows reproduce the committed numbers?

For every row of NEW.json (e.g. written by ``python -m benchmarks.run --out /tmp/regen --only dense: ...``), the
row of the same key in the committed file is looked up and the measured quantities that do not depend on the
machine's speed are compared: perplexity and its ratio, removed parameters, KV removed, per-task zero-shot
accuracy and accuracy retained (timings, speed-ups and peak RSS are not). Prints one line per value and exits 1
when a relative difference exceeds ``--rtol`` (the default allows float summation order: another thread count).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: row fields compared (numbers, or a dict of numbers for ``acc``; ``params`` and ``decoder_params``: the dense row)
FIELDS = ("params_removed", "params_removed_total", "kv_removed", "ppl", "ppl_ratio", "acc", "acc_retained", "params",
          "decoder_params")


def _values(row: dict) -> dict[str, float | None]:
    out = {}
    for name in FIELDS:
        value = row.get(name)
        if isinstance(value, dict):
            out.update({f"{name}.{k}": v for k, v in sorted(value.items())})
        else:
            out[name] = value
    return out


def compare(new: dict, old: dict, rtol: float) -> tuple[list[str], bool]:
    """Report lines and whether every compared value of ``new``'s rows is within ``rtol`` of ``old``'s."""
    committed = {r["key"]: r for r in old["rows"]}
    lines, ok = [], True
    for row in new["rows"]:
        ref = committed.get(row["key"])
        if row.get("error") or ref is None or ref.get("error"):
            lines.append(f"{row['key']}: not compared (error {row.get('error')!r}, committed row found: {ref is not None})")
            ok = False
            continue
        for name, value in _values(row).items():
            expected = _values(ref).get(name)
            if value is None and expected is None:
                continue
            diff = None if value is None or expected is None else abs(value - expected)
            rel = None if diff is None else diff / max(abs(expected), 1e-12)
            good = rel is not None and rel <= rtol
            ok &= good
            lines.append(f"{row['key']} {name}: rerun {value!r} committed {expected!r} abs diff {diff!r} "
                         f"{'ok' if good else 'DIFFERS'}")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare",
                                     description="compare rerun benchmark rows with the committed results")
    parser.add_argument("new", help="results JSON of the rerun")
    parser.add_argument("--against", default="benchmarks/results/smollm2.json", help="the committed results")
    parser.add_argument("--rtol", type=float, default=1e-4, help="largest relative difference accepted")
    args = parser.parse_args(argv)
    lines, ok = compare(json.loads(Path(args.new).read_text()), json.loads(Path(args.against).read_text()), args.rtol)
    sys.stdout.write("\n".join(lines) + f"\n{'same numbers' if ok else 'DIFFERENT numbers'} (rtol {args.rtol})\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
