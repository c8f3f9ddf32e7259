"""The one check command, the same locally and in CI: format, lint, types, tests.

    .venv/bin/python scripts/check.py [extra pytest arguments]

Runs each tool with this interpreter, stops at the first failure and returns its exit status.
pytest's exit status 5 (no tests collected) counts as a failure too: a check that ran nothing
proves nothing.
"""

from __future__ import annotations

import subprocess
import sys
import time

STEPS = [
    ("format", ["ruff", "format", "--check", "."]),
    ("lint", ["ruff", "check", "."]),
    ("types", ["mypy"]),
    ("tests", ["pytest", "--durations=15"]),
]


def main() -> int:
    for name, command in STEPS:
        if name == "tests":
            command = [*command, *sys.argv[1:]]
        started = time.monotonic()
        print(f"==> {name}: {' '.join(command)}", flush=True)
        status = subprocess.call([sys.executable, "-m", *command])
        print(f"==> {name}: exit {status} in {time.monotonic() - started:.0f}s", flush=True)
        if status != 0:
            if name == "tests" and status == 5:
                print("==> pytest collected no tests", flush=True)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
