"""The README's generated blocks: text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->`` markers is
rewritten from committed results files by the benchmark that owns them (``python -m benchmarks.memory --table``,
``python -m benchmarks.scale --readme``), so the README quotes those files instead of copies typed by hand."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace_block(name: str, lines: list[str], path: Path = README) -> bool:
    """Rewrite the block ``name`` of ``path`` with ``lines``; returns whether the text changed. A README without
    the block's markers is an error (a generated table must not silently stop being updated)."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path} needs exactly one '{begin}' ... '{end}' pair for its generated block")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    new = head + begin + "\n" + "\n".join(lines) + "\n" + end + tail
    if new != text:
        path.write_text(new)
    return new != text
