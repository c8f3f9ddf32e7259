"""Fixtures shared by the queue tests (test_queue.py, test_queue_cancel.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.bot.test_queue import Harness, make_config


@pytest.fixture
async def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    """A started queue on the fake engine; batches are logged to tmp_path/batches.jsonl."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    await h.open()
    yield h
    await h.close()
