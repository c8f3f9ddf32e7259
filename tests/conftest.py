"""Shared fixtures: the tiny random-weight model set, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

SIZE = 64
"""Image side used by most engine tests: 8x8 latents keep the tiny model fast on a CPU."""


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model set, generated locally (never downloaded)."""
    from engine.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
