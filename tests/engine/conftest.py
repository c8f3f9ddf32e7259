"""Engine fixtures: one Engine on the tiny models for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.engine import Engine
from tests.engine.support import tiny_settings


@pytest.fixture(scope="session")
def engine(tiny_root: Path) -> Engine:
    """An engine on the CPU with the tiny models, sending a preview every 2 steps."""
    return Engine(tiny_settings(tiny_root, preview_every=2))
