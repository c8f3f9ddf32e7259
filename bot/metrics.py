"""Prometheus metrics of the queue, served at GET /metrics by the web adapter.

Counters and histograms are fed by a queue listener that is cheap (no I/O) and never raises;
gauges are read from the queue when scraped. Each `Metrics` has its own `CollectorRegistry`, so
several queues (and tests) never share state and nothing lands in the global default registry.

Replayed final updates (handed over again after a restart) are not counted: the process that
finished the job counted it.

Batch sizes are derived from STARTED updates, because the queue does not publish batches: every
job of a batch gets the same `job.started` timestamp when the batch is sent to the engine, and the
engine reports Started for all of a batch's jobs before any of them ends. So a batch is a run of
STARTED updates with one `job.started` value; its size is observed once, at the first final update
of one of its jobs or at a STARTED with another timestamp (a batch whose jobs were all re-queued by
an engine crash ends no other way), whichever comes first. Jobs the engine rejected as bad input
are never started and are not counted; a batch the engine died on before starting anything is not
observed at all.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from bot.queue import JobQueue, Update, UpdateKind
from engine.errors import FailureReason
from engine.protocol import Task

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic Prometheus text format, which every Prometheus version scrapes."""

_LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)
_RATE_WINDOW = 60.0
"""Seconds of finished images behind `easelbot_images_per_second`."""


class Metrics:
    """The queue's numbers in Prometheus form, in a registry of their own."""

    def __init__(self, queue: JobQueue, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.queue = queue
        self._clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.submitted = Counter("easelbot_jobs_submitted", "Jobs accepted into the queue", ["platform"], registry=r)
        self.finished = Counter("easelbot_jobs", "Jobs that ended, by end state", ["state", "platform"], registry=r)
        self.failures = Counter("easelbot_job_failures", "Failed jobs, by reason", ["reason"], registry=r)
        self.images = Counter("easelbot_images", "Result images produced", ["task"], registry=r)
        self.batch_size = Histogram(
            "easelbot_batch_size", "Jobs the engine started per batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.latency = Histogram(
            "easelbot_job_latency_seconds",
            "Submit to final update",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.wait = Histogram(
            "easelbot_queue_wait_seconds", "Submit to first start", buckets=_LATENCY_BUCKETS, registry=r
        )
        for reason in FailureReason:
            if reason is not FailureReason.CANCELLED:  # cancelled jobs end as cancelled, not failed
                self.failures.labels(reason=reason.value)
        for task in Task:
            self.images.labels(task=task.value)
        self._recent: deque[tuple[float, int]] = deque()
        """(when, result images) of jobs finished within the rate window, oldest first."""
        self._batch_started: float | None = None
        self._batch_jobs: set[str] = set()
        """Ids of the open batch's started jobs; empty when no batch is open."""
        r.register(_QueueCollector(self))
        queue.listen(self.on_update)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE

    def images_per_second(self) -> float:
        """Result images finished in the last minute, per second."""
        self._forget_old(self._clock())
        return sum(n for _, n in self._recent) / _RATE_WINDOW

    async def on_update(self, update: Update) -> None:
        """The queue listener: count one update; cheap, no I/O, never raises."""
        try:
            self._count(update)
        except Exception:  # metrics must never disturb the queue
            log.exception("metrics could not count the %s update of job %s", update.kind, update.job.id)

    def _count(self, update: Update) -> None:
        if update.replay:
            return
        job = update.job
        platform = job.requester.platform
        task = job.request.task.value
        if update.kind is UpdateKind.QUEUED:
            self.submitted.labels(platform=platform).inc()
        elif update.kind is UpdateKind.STARTED:
            if self._batch_jobs and job.started != self._batch_started:
                self._close_batch()
            self._batch_started = job.started
            self._batch_jobs.add(job.id)
            if job.started is not None and job.attempts <= 1:  # a re-run after a crash waited once already
                self.wait.observe(max(0.0, job.started - job.created))
        elif update.kind.final:
            if job.id in self._batch_jobs:
                self._close_batch()
            self.finished.labels(state=update.kind.value, platform=platform).inc()
            if update.kind is UpdateKind.FAILED:
                self.failures.labels(reason=job.reason.value if job.reason is not None else "unknown").inc()
            if update.kind is UpdateKind.DONE:
                made = sum(1 for image in job.images if image.kind == "result")
                self.images.labels(task=task).inc(made)
                now = self._clock()
                self._recent.append((now, made))
                self._forget_old(now)
            if job.finished is not None:
                self.latency.labels(task=task).observe(max(0.0, job.finished - job.created))

    def _close_batch(self) -> None:
        self.batch_size.observe(len(self._batch_jobs))
        self._batch_jobs = set()

    def _forget_old(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - _RATE_WINDOW:
            self._recent.popleft()


class _QueueCollector:
    """Gauges read from the queue at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families(live=False)

    def collect(self) -> Iterable[Metric]:
        return self._families(live=True)

    def _families(self, *, live: bool) -> list[Metric]:
        length = GaugeMetricFamily("easelbot_queue_length", "Jobs waiting in the queue")
        running = GaugeMetricFamily("easelbot_jobs_running", "Jobs the engine is running")
        step = GaugeMetricFamily(
            "easelbot_step_seconds",
            "Measured seconds per denoising step of one 512x512 text-to-image (what ETAs are made of); absent until "
            "measured",
        )
        rate = GaugeMetricFamily("easelbot_images_per_second", "Result images finished in the last minute, per second")
        ready = GaugeMetricFamily("easelbot_engine_ready", "1 when the engine is up and its models are loaded")
        info = InfoMetricFamily("easelbot_engine", "The running engine's device and dtype; absent until ready")
        memory = GaugeMetricFamily(
            "easelbot_gpu_memory_bytes", "Peak GPU memory of the last batch, as the engine reported it"
        )
        busy = CounterMetricFamily(
            "easelbot_engine_busy_seconds", "Seconds the local engine's GPU loop was busy with batches"
        )
        busy_ratio = GaugeMetricFamily(
            "easelbot_engine_busy_ratio",
            "Share of the last minute the local engine's GPU loop was busy; absent until it is ready",
        )
        writes = CounterMetricFamily(
            "easelbot_image_write_seconds",
            "Seconds spent writing result PNGs to the store (the engine's later messages wait meanwhile)",
        )
        written = CounterMetricFamily("easelbot_images_written", "Result PNGs written to the store")
        if live:
            queue = self._metrics.queue
            stats = queue.stats()
            length.add_metric([], stats.queued)
            running.add_metric([], stats.running)
            seconds = stats.seconds_per_image_step
            if seconds is not None and math.isfinite(seconds):
                step.add_metric([], seconds)
            rate.add_metric([], self._metrics.images_per_second())
            engine = queue.ready
            ready.add_metric([], 0 if engine is None else 1)
            if engine is not None:
                info.add_metric([], {"device": engine.device, "dtype": engine.dtype})
            if stats.gpu_memory_bytes is not None:
                memory.add_metric([], stats.gpu_memory_bytes)
            busy.add_metric([], stats.gpu_busy_seconds)
            if stats.gpu_busy_fraction is not None:
                busy_ratio.add_metric([], stats.gpu_busy_fraction)
            writes.add_metric([], stats.image_write_seconds)
            written.add_metric([], stats.images_written)
        families: list[Metric] = [length, running, step, rate, ready, info, memory, busy, busy_ratio, writes, written]
        return [*families, *self._worker_families(live=live)]

    def _worker_families(self, *, live: bool) -> list[Metric]:
        """Per Redis engine worker ([redis] enabled), from the queue's last read of their heartbeats."""
        labels = ["worker"]
        up = GaugeMetricFamily("easelbot_worker_info", "A live Redis engine worker", labels=[*labels, "host", "gpu"])
        busy = GaugeMetricFamily("easelbot_worker_busy", "1 while the worker runs a batch", labels=labels)
        draining = GaugeMetricFamily("easelbot_worker_draining", "1 while the worker drains", labels=labels)
        batches = GaugeMetricFamily(
            "easelbot_worker_batches", "Batches the worker finished since it started", labels=labels
        )
        images = GaugeMetricFamily("easelbot_worker_images", "Images the worker made since it started", labels=labels)
        age = GaugeMetricFamily(
            "easelbot_worker_heartbeat_age_seconds", "Seconds since its last heartbeat", labels=labels
        )
        gpu = GaugeMetricFamily("easelbot_worker_gpu_memory_bytes", "Total memory of the worker's GPU", labels=labels)
        if live:
            now = time.time()
            for worker in self._metrics.queue.workers:
                up.add_metric([worker.id, worker.host, worker.gpu or worker.device], 1)
                busy.add_metric([worker.id], 1 if worker.busy else 0)
                draining.add_metric([worker.id], 1 if worker.draining else 0)
                batches.add_metric([worker.id], worker.batches)
                images.add_metric([worker.id], worker.images)
                age.add_metric([worker.id], max(0.0, now - worker.heartbeat))
                if worker.gpu_memory_bytes is not None:
                    gpu.add_metric([worker.id], worker.gpu_memory_bytes)
        return [up, busy, draining, batches, images, age, gpu]
