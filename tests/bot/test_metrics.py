"""Prometheus metrics of the queue, read back with prometheus_client's own text parser.

The end-to-end tests run a real queue on the fake engine (tests/fakes.py); the unit tests feed
synthetic updates straight into the listener.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.jobs import Job, JobState, Requester, StoredImage
from bot.metrics import Metrics
from bot.queue import JobQueue, Update, UpdateKind
from bot.store import JobStore
from engine.errors import FailureReason
from tests.bot.test_queue import Harness, make_config, req, who

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


def samples(metrics: Metrics) -> Samples:
    """Every sample of a scrape, keyed by name and sorted labels; `_created` timestamps left out."""
    text, content_type = metrics.render()
    assert content_type == TEXT_FORMAT
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def series(scrape: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one name, by labels."""
    return {labels: value for (sample, labels), value in scrape.items() if sample == name}


async def test_a_real_queue_is_counted_per_label_and_its_gauges_return_to_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submissions, end states, images, latency/wait/batch histograms and queue gauges match what the queue did.

    One discord job is cancelled while queued; a discord job of three images and a slack job of one
    run together in one batch on the fake engine.
    """
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    harness = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await harness.open(start=False)
    metrics = Metrics(queue)
    cancelled = await queue.cancel((await queue.submit(req(), who("ann"))).id)
    three = await queue.submit(req(count=3, seed=2), who("bob"))
    slack = await queue.submit(req(seed=3), Requester(platform="slack", user_id="cat", guild_id="T1"))

    before = samples(metrics)
    assert before[("easelbot_queue_length", ())] == 2
    assert before[("easelbot_jobs_running", ())] == 0
    assert before[("easelbot_engine_ready", ())] == 0
    assert not series(before, "easelbot_engine_info")
    assert not series(before, "easelbot_gpu_memory_bytes"), "absent until the engine reports memory"
    assert not series(before, "easelbot_step_seconds"), "absent until the engine's speed is measured"

    await queue.start()
    ids = {cancelled.id, three.id, slack.id}
    await harness.wait_for(lambda: set(harness.finals()) == ids)
    await harness.wait_for(lambda: queue.stats().seconds_per_image_step is not None)
    after = samples(metrics)
    await harness.close()

    assert harness.batches() == [[three.id, slack.id]]
    assert series(after, "easelbot_jobs_submitted_total") == {
        (("platform", "discord"),): 2,
        (("platform", "slack"),): 1,
    }
    assert series(after, "easelbot_jobs_total") == {
        (("platform", "discord"), ("state", "cancelled")): 1,
        (("platform", "discord"), ("state", "done")): 1,
        (("platform", "slack"), ("state", "done")): 1,
    }
    assert set(series(after, "easelbot_job_failures_total").values()) == {0}
    assert series(after, "easelbot_images_total") == {
        (("task", "txt2img"),): 4,
        (("task", "img2img"),): 0,
        (("task", "inpaint"),): 0,
        (("task", "upscale"),): 0,
    }
    assert after[("easelbot_images_per_second", ())] == pytest.approx(4 / 60)
    assert after[("easelbot_job_latency_seconds_count", (("task", "txt2img"),))] == 3
    assert after[("easelbot_queue_wait_seconds_count", ())] == 2
    assert after[("easelbot_batch_size_count", ())] == 1
    assert after[("easelbot_batch_size_sum", ())] == 2
    assert after[("easelbot_batch_size_bucket", (("le", "1.0"),))] == 0
    assert after[("easelbot_batch_size_bucket", (("le", "2.0"),))] == 1
    assert after[("easelbot_queue_length", ())] == 0
    assert after[("easelbot_jobs_running", ())] == 0
    assert after[("easelbot_engine_ready", ())] == 1
    assert series(after, "easelbot_engine_info") == {(("device", "fake"), ("dtype", "none")): 1}
    assert after[("easelbot_gpu_memory_bytes", ())] == 123_456_789  # what the fake engine reports
    assert after[("easelbot_step_seconds", ())] > 0
    assert after[("easelbot_images_written_total", ())] == 4
    assert after[("easelbot_image_write_seconds_total", ())] > 0


async def test_an_engine_crash_counts_a_failure_by_reason_and_two_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that crashes the engine twice: one failure `engine_crashed`, two batches of one, one queue wait."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    harness = Harness(tmp_path, make_config(restart_backoff_s=0.05), "tests.fakes:fake_engine")
    queue = await harness.open()
    metrics = Metrics(queue)
    job = await queue.submit(req("crash"), who("ann"))
    await harness.wait_for(lambda: job.id in harness.finals())
    scrape = samples(metrics)
    await harness.close()
    assert scrape[("easelbot_job_failures_total", (("reason", "engine_crashed"),))] == 1
    assert sum(series(scrape, "easelbot_job_failures_total").values()) == 1
    assert series(scrape, "easelbot_jobs_total") == {(("platform", "discord"), ("state", "failed")): 1}
    assert scrape[("easelbot_batch_size_count", ())] == 2
    assert scrape[("easelbot_batch_size_sum", ())] == 2
    assert scrape[("easelbot_queue_wait_seconds_count", ())] == 1, "the re-run after the crash waited once"
    assert sum(series(scrape, "easelbot_images_total").values()) == 0


@pytest.fixture
async def idle_queue(tmp_path: Path) -> AsyncIterator[JobQueue]:
    """A queue that is never started: its listeners only see what a test feeds them."""
    store = await JobStore.open(tmp_path / "jobs.db", tmp_path / "outputs")
    yield JobQueue(make_config(), store)
    await store.close()


def job(job_id: str, *, started: float | None = None, attempts: int = 1, state: JobState = JobState.RUNNING) -> Job:
    """A synthetic job created at t=0."""
    return Job(
        id=job_id, request=req(), requester=who("ann"), state=state, created=0.0, started=started, attempts=attempts,
        finished=None if started is None else started + 1,
    )  # fmt: skip


def started(job_id: str, at: float, *, attempts: int = 1) -> Update:
    return Update(job=job(job_id, started=at, attempts=attempts), kind=UpdateKind.STARTED)


def ended(job_id: str, at: float | None, kind: UpdateKind = UpdateKind.DONE, *, replay: bool = False) -> Update:
    return Update(job=job(job_id, started=at, state=JobState(kind.value)), kind=kind, replay=replay)


async def test_batch_sizes_are_derived_from_started_timestamps(idle_queue: JobQueue) -> None:
    """A batch is a run of STARTEDs sharing `job.started`, observed at its first member's end or a new timestamp.

    Not closed by the end of a job outside it (cancelled while queued, rejected before starting);
    a batch all re-queued by a crash is closed by the next STARTED; a frozen clock still separates
    batches that follow one another; replayed final updates change nothing.
    """
    metrics = Metrics(idle_queue)
    updates = [
        # batch of three at t=100; a job cancelled while queued ends meanwhile
        started("a1", 100), started("a2", 100), started("a3", 100),
        ended("x", None, UpdateKind.CANCELLED),
        ended("a1", 100), ended("a2", 100, UpdateKind.FAILED), ended("a3", 100),
        # batch of one at t=200, re-queued by an engine crash: no final update
        started("b1", 200),
        # its re-run at t=300 together with c1; a job rejected as bad input before starting
        ended("d1", 300, UpdateKind.FAILED),
        started("b1", 300, attempts=2), started("c1", 300),
        ended("b1", 300), ended("c1", 300),
        # two batches of one in a row, both at t=400 (a frozen clock)
        started("e1", 400), ended("e1", 400),
        started("e2", 400), ended("e2", 400),
        # a final update handed over again after a restart
        ended("old", 50, replay=True),
    ]  # fmt: skip
    for update in updates:
        await metrics.on_update(update)
    scrape = samples(metrics)
    assert scrape[("easelbot_batch_size_count", ())] == 5  # sizes 3, 1, 2, 1, 1
    assert scrape[("easelbot_batch_size_sum", ())] == 8
    buckets = {labels[0][1]: value for labels, value in series(scrape, "easelbot_batch_size_bucket").items()}
    assert buckets == {
        "1.0": 3, "2.0": 4, "3.0": 5, "4.0": 5, "6.0": 5, "8.0": 5, "12.0": 5, "16.0": 5, "+Inf": 5,
    }  # fmt: skip
    assert scrape[("easelbot_queue_wait_seconds_count", ())] == 7, "b1's second start is not a second wait"
    assert sum(series(scrape, "easelbot_jobs_total").values()) == 9, "every final update but the replay"
    assert scrape[("easelbot_job_failures_total", (("reason", "unknown"),))] == 2


async def test_images_per_second_covers_the_last_minute_of_result_images(idle_queue: JobQueue) -> None:
    """Only `result` images count (not an upscale's bicubic comparison); they leave the rate after 60 s."""
    now = [1000.0]
    metrics = Metrics(idle_queue, clock=lambda: now[0])
    images = tuple(StoredImage(digest=f"d{i}", seed=i, width=64, height=64) for i in range(3))
    images += (StoredImage(digest="b", seed=0, width=64, height=64, kind="bicubic"),)
    done = Job(id="j", request=req(count=3), requester=who("ann"), state=JobState.DONE, images=images, finished=5.0)
    await metrics.on_update(Update(job=done, kind=UpdateKind.DONE))
    assert samples(metrics)[("easelbot_images_total", (("task", "txt2img"),))] == 3
    assert samples(metrics)[("easelbot_images_per_second", ())] == pytest.approx(3 / 60)
    now[0] += 59
    assert samples(metrics)[("easelbot_images_per_second", ())] == pytest.approx(3 / 60)
    now[0] += 1
    assert samples(metrics)[("easelbot_images_per_second", ())] == 0


async def test_the_listener_logs_instead_of_raising(idle_queue: JobQueue, caplog: pytest.LogCaptureFixture) -> None:
    """A metric that cannot be updated is logged; the update still reaches the queue's other listeners."""
    metrics = Metrics(idle_queue)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    metrics.submitted.labels = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="bot.metrics"):
        await metrics.on_update(Update(job=job("q"), kind=UpdateKind.QUEUED))
    assert "metrics could not count the queued update of job q" in caplog.text


async def test_each_instance_has_its_own_registry(idle_queue: JobQueue) -> None:
    """Two Metrics side by side do not collide and nothing is registered in the global default registry."""
    from prometheus_client import REGISTRY

    first = Metrics(idle_queue)
    second = Metrics(idle_queue)
    await first.on_update(Update(job=job("q"), kind=UpdateKind.QUEUED))
    assert first.registry is not second.registry
    assert series(samples(first), "easelbot_jobs_submitted_total") == {(("platform", "discord"),): 1}
    assert series(samples(second), "easelbot_jobs_submitted_total") == {}
    assert REGISTRY.get_sample_value("easelbot_jobs_submitted_total", {"platform": "discord"}) is None
    assert FailureReason.CANCELLED.value not in {
        labels[0][1] for labels in series(samples(first), "easelbot_job_failures_total")
    }, "cancelled jobs are counted as cancelled, not as failures"
