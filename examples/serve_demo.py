"""Generate with the demo's pruned SmolLM2 in llama.cpp (llama-cpp-python), next to transformers.

    make serve-demo      # builds llama.cpp's Python binding once (cached outside the repository), then runs this

Runs ``make demo``'s job first when its GGUF file is missing. Prints both continuations of the demo prompt and
llama.cpp's decode speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/ (not installed)

import demo_core  # noqa: E402  (examples/demo_core.py)

from benchmarks.serving import open_gguf  # noqa: E402


def main(out_dir: str = "outputs/demo-smollm2-pruned", max_new_tokens: int = 30) -> dict:
    summary_file = Path(out_dir, "demo_summary.json")
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    if "gguf" not in summary or not Path(summary["gguf"]["file"]).exists():
        summary = demo_core.main(out_dir=out_dir, max_new_tokens=max_new_tokens)
    llm = open_gguf(summary["gguf"]["file"], n_ctx=512, n_threads=2)
    start = time.perf_counter()
    done = llm.create_completion(demo_core.PROMPT, max_tokens=max_new_tokens, temperature=0.0)
    seconds = time.perf_counter() - start
    text = demo_core.PROMPT + done["choices"][0]["text"]
    print(f"llama.cpp ({summary['gguf']['architecture']}, Q8_0): {text!r}")
    print("(Q8_0 weights are 8-bit: a greedy continuation may part from the float32 one after a few tokens)")
    print(f"transformers (float32):      {summary['generated']!r}")
    print(f"{done['usage']['completion_tokens']} tokens in {seconds:.2f} s "
          f"({done['usage']['completion_tokens'] / seconds:.1f} tokens/s incl. the prompt)")
    return {"llama_cpp": text, "transformers": summary["generated"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo-smollm2-pruned", help="the demo's output folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    main(out_dir=args.out)
