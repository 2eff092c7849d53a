"""The benchmark's texts beside the Austen novels: Python source code from the interpreter's own standard library.

Every Python installation ships its standard library as source (PSF licence), so a code model can be calibrated and
evaluated on code with no download. The split is by module name, so no file is in both sets:

- calibration: the top-level modules ``a*`` to ``m*`` (``abc.py`` ... ``mimetypes.py``, ``modulefinder.py``);
- evaluation: the top-level modules ``n*`` to ``z*`` (``netrc.py`` ... ``zipimport.py``).

Only top-level ``*.py`` files count (no packages, no tests); files are read in sorted order and joined by two
newlines. The text depends on the Python version, which the results record (``code_source``).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import torch

#: the first letters of the calibration modules; the other letters are the evaluation modules
CODE_CALIBRATION_LETTERS = "abcdefghijklm"


def stdlib_folder() -> Path:
    """The folder of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(part: str) -> list[Path]:
    """The top-level standard library modules of ``part`` (``"calibration"`` or ``"evaluation"``), sorted."""
    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be 'calibration' or 'evaluation', got {part!r}")
    files = sorted(p for p in stdlib_folder().glob("*.py") if not p.name.startswith("_"))
    in_calibration = [p.name[0].lower() in CODE_CALIBRATION_LETTERS for p in files]
    chosen = [p for p, c in zip(files, in_calibration) if c == (part == "calibration")]
    if not chosen:
        raise FileNotFoundError(f"no standard library sources found in {stdlib_folder()}")
    return chosen


def stdlib_code(part: str) -> str:
    """The source text of the ``part`` modules (see the module docstring), joined by blank lines."""
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in stdlib_modules(part))


def code_source() -> dict:
    """What the code text is, for the results file: Python version, folder and the module lists' ends."""
    cal, ev = stdlib_modules("calibration"), stdlib_modules("evaluation")
    return {"python": sys.version.split()[0], "stdlib": str(stdlib_folder()),
            "calibration_modules": f"{len(cal)} files, {cal[0].name} ... {cal[-1].name}",
            "evaluation_modules": f"{len(ev)} files, {ev[0].name} ... {ev[-1].name}"}


def spread_windows(windows: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` of ``windows`` ``[N, T]`` evenly spaced over the whole text (all of them when N <= n), so that an
    evaluation of a few windows covers many files instead of the first few."""
    total = windows.shape[0]
    if total <= n:
        return windows
    picks = torch.linspace(0, total - 1, n).round().long()  # [n]
    return windows[picks].clone()  # [n, T]
