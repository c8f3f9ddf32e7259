"""How every benchmark hands over its result: the JSON report on stdout and, with --out, in a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def save(report: dict[str, Any], out: Path | None) -> None:
    """Write what is measured so far to `out`, marked partial: a run stopped at its time limit (as on a lent
    GPU machine, bench/gpu_session.py) still leaves its finished figures behind."""
    if out:
        _write({"partial": True, **report}, out)


def emit(report: dict[str, Any], out: Path | None) -> None:
    """Print the finished report as indented JSON; also write it to `out` (folders created) when given."""
    print(json.dumps(report, indent=2))
    if out:
        _write(report, out)


def _write(report: dict[str, Any], out: Path) -> None:
    """Atomically: a process killed mid-write (SIGKILL at a stage's limit) leaves the previous complete file,
    never a truncated one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    handle, temporary = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(handle, 0o644)  # as a plain write would leave it (mkstemp makes it private)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
