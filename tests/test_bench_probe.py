"""bench/probe.py's reading of a profiler trace: where the device waited, by phase of the engine's work."""

from __future__ import annotations

import pytest

from bench.probe import PHASES, RUN, TEXT_ENCODER, VAE_DECODER, trace_summary

MS = 1_000_000
"""Nanoseconds in a millisecond (the profiler's unit)."""


def _batch(start: int) -> tuple[list[tuple[str, int, int]], list[tuple[int, int]]]:
    """One 100 ms batch from `start` ms: 5 ms before its text encoder (2 ms), the loop from 8 to 80 ms, two VAE
    decoder calls (80-88, 89-95 ms), 5 ms after. Device work covers the encoder, the loop but for a 3 ms gap
    at 30 ms and a 2 ms one at its start, and each decoder call."""
    at = start * MS
    ranges = [
        (RUN, at, at + 100 * MS),
        (TEXT_ENCODER, at + 5 * MS, at + 7 * MS),
        (VAE_DECODER, at + 80 * MS, at + 88 * MS),
        (VAE_DECODER, at + 89 * MS, at + 95 * MS),
    ]
    work = [
        (at + 5 * MS, at + 7 * MS),
        (at + 9 * MS, at + 30 * MS),
        (at + 20 * MS, at + 25 * MS),  # overlapping work counts once
        (at + 33 * MS, at + 80 * MS),
        (at + 80 * MS, at + 88 * MS),
        (at + 89 * MS, at + 95 * MS),
    ]
    return ranges, work


def test_idle_time_is_split_by_the_phase_it_falls_in() -> None:
    """Two batches 10 ms apart: each idle stretch lands in its phase, the busy time counts overlaps once, and
    the largest stretches come first."""
    first_ranges, first_work = _batch(0)
    second_ranges, second_work = _batch(110)
    summary = trace_summary(first_work + second_work, first_ranges + second_ranges)
    assert summary["window seconds"] == 0.21
    assert summary["device work seen"] is True
    assert summary["device records"] == 12
    assert summary["device busy seconds"] == pytest.approx(2 * (2 + 21 + 47 + 8 + 6) / 1000)
    by_phase = summary["device idle seconds by phase"]
    assert list(by_phase) == list(PHASES)
    assert by_phase == {
        PHASES[0]: 0.01,  # 100-110 ms: the engine loop and the bot
        PHASES[1]: 0.01,  # 0-5 ms in each batch
        PHASES[2]: 0.0,
        PHASES[3]: 0.01,  # 7-9 and 30-33 ms in each
        PHASES[4]: 0.002,  # 88-89 ms in each
        PHASES[5]: 0.01,  # 95-100 ms in each
    }
    assert sum(by_phase.values()) + summary["device busy seconds"] == pytest.approx(0.21)
    largest = summary["largest idle stretches"]
    # 95-115 ms: the first batch's last 5 ms, the 10 ms between, the second's first 5 ms: one stretch
    assert largest[0] == {"seconds": 0.02, "at seconds": 0.095, "phase": PHASES[0]}
    assert [stretch["seconds"] for stretch in largest] == sorted((s["seconds"] for s in largest), reverse=True)
    assert summary["device idle stretches over 1 ms"] == 7  # 0-5, 7-9, 30-33, 95-115, 117-119, 140-143, 205-210


def test_idle_time_between_the_two_text_encoder_calls_is_the_text_encoders() -> None:
    """diffusers encodes the prompts, tokenizes the negative prompts, then encodes those: the wait between the
    two calls belongs to the text encoder, not to the denoising loop."""
    ranges = [(RUN, 0, 60 * MS), (TEXT_ENCODER, 10 * MS, 15 * MS), (TEXT_ENCODER, 25 * MS, 30 * MS)]
    work = [(10 * MS, 15 * MS), (25 * MS, 30 * MS), (32 * MS, 60 * MS)]
    by_phase = trace_summary(work, ranges)["device idle seconds by phase"]
    assert (by_phase[PHASES[1]], by_phase[PHASES[2]], by_phase[PHASES[3]]) == (0.01, 0.01, 0.002)


def test_work_outside_the_batches_and_a_batch_without_an_encoder_are_handled() -> None:
    """Device work before the first batch or after the last is cut to the window; an upscale-like batch with no
    text encoder range puts its early idle time with the denoising loop."""
    ranges = [(RUN, 0, 50 * MS), (VAE_DECODER, 40 * MS, 45 * MS)]
    work = [(-10 * MS, 10 * MS), (40 * MS, 45 * MS), (60 * MS, 70 * MS)]
    summary = trace_summary(work, ranges)
    assert summary["device busy seconds"] == 0.015
    by_phase = summary["device idle seconds by phase"]
    assert by_phase[PHASES[3]] == 0.03
    assert by_phase[PHASES[5]] == 0.005


def test_no_batch_or_no_device_work_says_so() -> None:
    """A trace of the CPU alone has no device records; a trace without a batch has nothing to measure."""
    assert trace_summary([], [(RUN, 0, 5 * MS)]) == {"window seconds": 0.005, "device work seen": False}
    assert trace_summary([(0, MS)], []) == {"error": "no traced batch"}
