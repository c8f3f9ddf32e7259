"""Prometheus metrics of a real queue (fake GPU work), read back with Prometheus' own parser."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.jobs import Requester
from bot.metrics import Metrics
from tests.bot.test_queue import Harness, make_config, req, who


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


async def test_counters_histograms_and_gauges_follow_the_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Submitted, finished, failed and image counts, latency and batch histograms, queue gauges, engine readiness."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    harness = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await harness.open(start=False)
    metrics = Metrics(queue)
    cancelled = await queue.submit(req(), who("ann"))
    await queue.cancel(cancelled.id)
    three = await queue.submit(req(count=3, seed=2), who("bob"))
    slack = await queue.submit(req(seed=3), Requester(platform="slack", user_id="cat", guild_id="T1"))
    before = _samples(metrics)
    assert before[("easelbot_queue_length", ())] == 2
    await queue.start()
    for job in (three, slack):
        await harness.wait_final(job.id)
    after = _samples(metrics)
    assert after[("easelbot_jobs_submitted_total", (("platform", "discord"),))] == 2
    assert after[("easelbot_jobs_submitted_total", (("platform", "slack"),))] == 1
    assert after[("easelbot_jobs_total", (("platform", "discord"), ("state", "cancelled")))] == 1
    assert after[("easelbot_jobs_total", (("platform", "discord"), ("state", "done")))] == 1
    assert after[("easelbot_jobs_total", (("platform", "slack"), ("state", "done")))] == 1
    assert after[("easelbot_images_total", (("task", "txt2img"),))] == 4
    assert after[("easelbot_job_latency_seconds_count", (("task", "txt2img"),))] == 3
    assert after[("easelbot_queue_wait_seconds_count", ())] == 2
    assert after[("easelbot_batch_size_count", ())] == 1  # the two jobs shared one batch
    assert after[("easelbot_batch_size_sum", ())] == 2
    assert after[("easelbot_queue_length", ())] == 0
    assert after[("easelbot_jobs_running", ())] == 0
    assert after[("easelbot_engine_ready", ())] == 1
    assert after[("easelbot_images_per_second", ())] == pytest.approx(4 / 60)
    assert after[("easelbot_step_seconds", ())] > 0
    await harness.close()


async def test_failures_are_counted_by_reason(tmp_path: Path) -> None:
    """A job that crashes the engine twice counts once under reason engine_crashed."""
    harness = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await harness.open()
    metrics = Metrics(queue)
    job = await queue.submit(req("crash"), who("ann"))
    await harness.wait_final(job.id)
    samples = _samples(metrics)
    assert samples[("easelbot_job_failures_total", (("reason", "engine_crashed"),))] == 1
    await harness.close()
