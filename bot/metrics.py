"""Prometheus metrics of the queue, served at /metrics by the web adapter.

Counters and histograms are fed by a queue listener (cheap, no I/O, never raises); gauges are read
from the queue when scraped. Each Metrics has its own registry, so several queues (and tests) never
share state. GPU memory is not exported: the bot process never imports torch, and the engine does
not report memory in its events yet (a `memory_bytes` field on Done would be where it comes from).
"""

from __future__ import annotations

import math
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bot.queue import JobQueue, Update, UpdateKind

_LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16)


class Metrics:
    """The queue's numbers in Prometheus form."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue
        self._clock = time.time
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("easelbot_queue_length", "Jobs waiting in the queue", registry=r).set_function(
            lambda: queue.stats().queued
        )
        Gauge("easelbot_jobs_running", "Jobs the engine is running", registry=r).set_function(
            lambda: queue.stats().running
        )
        Gauge("easelbot_engine_ready", "1 when the engine is up and its models are loaded", registry=r).set_function(
            lambda: 1 if queue.ready is not None else 0
        )
        Gauge("easelbot_step_seconds", "Measured seconds per image per denoising step", registry=r).set_function(
            lambda: queue.stats().seconds_per_image_step or math.nan
        )
        Gauge("easelbot_images_per_second", "Images finished in the last minute, per second", registry=r).set_function(
            self._images_per_second
        )
        self.submitted = Counter("easelbot_jobs_submitted", "Jobs accepted", ["platform"], registry=r)
        self.finished = Counter("easelbot_jobs", "Jobs finished, by end state", ["state", "platform"], registry=r)
        self.failures = Counter("easelbot_job_failures", "Failed jobs by reason", ["reason"], registry=r)
        self.images = Counter("easelbot_images", "Images produced", ["task"], registry=r)
        self.batch_size = Histogram("easelbot_batch_size", "Jobs per engine batch", buckets=_BATCH_BUCKETS, registry=r)
        self.latency = Histogram(
            "easelbot_job_latency_seconds",
            "Submit to final answer",
            ["task"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.wait = Histogram("easelbot_queue_wait_seconds", "Submit to start", buckets=_LATENCY_BUCKETS, registry=r)
        self._recent: deque[tuple[float, int]] = deque(maxlen=10_000)
        self._batch_started: float | None = None
        self._batch_jobs = 0
        queue.listen(self._on_update)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _images_per_second(self) -> float:
        cutoff = self._clock() - 60
        return sum(n for when, n in self._recent if when >= cutoff) / 60

    async def _on_update(self, update: Update) -> None:
        if update.replay:  # already counted before the restart
            return
        job = update.job
        platform = job.requester.platform
        if update.kind is UpdateKind.QUEUED:
            self.submitted.labels(platform=platform).inc()
        elif update.kind is UpdateKind.STARTED:
            # Jobs of one batch share their start time (set when the batch is sent to the engine).
            if job.started != self._batch_started:
                self._close_batch()
                self._batch_started = job.started
            self._batch_jobs += 1
            if job.started is not None:
                self.wait.observe(max(0.0, job.started - job.created))
        elif update.kind.final:
            self._close_batch()
            self.finished.labels(state=str(update.kind), platform=platform).inc()
            if update.kind is UpdateKind.FAILED and job.reason is not None:
                self.failures.labels(reason=str(job.reason)).inc()
            if update.kind is UpdateKind.DONE and job.finished is not None:
                made = sum(1 for image in job.images if image.kind == "result")
                self.images.labels(task=str(job.request.task)).inc(made)
                self._recent.append((job.finished, made))
            if job.finished is not None:
                self.latency.labels(task=str(job.request.task)).observe(max(0.0, job.finished - job.created))

    def _close_batch(self) -> None:
        if self._batch_jobs:
            self.batch_size.observe(self._batch_jobs)
        self._batch_jobs = 0
