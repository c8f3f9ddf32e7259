"""`easelbot run`: the long-running bot process (store, queue, engine child, adapters), stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from bot.config import Config
from bot.queue import JobQueue
from bot.store import JobStore

log = logging.getLogger("easelbot")

HOUSEKEEPING_INTERVAL_S = 3600.0


async def housekeeping(store: JobStore, config: Config, interval: float = HOUSEKEEPING_INTERVAL_S) -> None:
    """Apply the outputs retention (age, then total size) now and every `interval` seconds."""
    queue = config.queue
    if not (queue.retention_days or queue.retention_max_gb):
        return
    max_age = queue.retention_days * 86400 if queue.retention_days else float("inf")
    max_bytes = int(queue.retention_max_gb * 1e9) if queue.retention_max_gb else 2**62
    while True:
        deleted = await store.prune(max_age_s=max_age, max_bytes=max_bytes)
        if deleted:
            log.info("retention: deleted %d old result files", deleted)
        await asyncio.sleep(interval)


def summary(config: Config, web_url: str | None = None) -> str:
    """The start-up summary: where jobs live, which engine, which models, which limits, which adapters."""
    queue, limits = config.queue, config.limits
    engine = f"standalone at {queue.engine_socket}" if queue.engine_socket else "child process"
    models = ", ".join(f"{name} ({spec.kind})" for name, spec in sorted(config.models.items()))
    return "\n".join(
        [
            "easelbot starting",
            f"  store:    {Path(queue.store).resolve()} (results in {Path(queue.outputs).resolve()})",
            f"  engine:   {engine}, device {config.engine.device}, dtype {config.engine.dtype}",
            f"  models:   {models}; default {config.engine.default_model}, upscaler {config.engine.default_upscaler}",
            f"  batching: up to {queue.max_batch_images} images, waiting at most {queue.max_wait_ms} ms",
            f"  limits:   {queue.max_queued_per_user} jobs a user, {queue.max_queue_length} in all, "
            f"{queue.max_images_per_user_per_hour or 'unlimited'} images a user an hour, "
            f"{limits.max_width}x{limits.max_height} max, {queue.job_timeout_s:g} s a job",
            f"  adapters: {f'web playground and API at {web_url}' if web_url else 'web disabled'}"
            " (Discord and Slack arrive in later releases)",
        ]
    )


async def run_service(config: Config, *, port: int | None = None) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully within `queue.shutdown_grace_s`."""
    from bot.adapters.web import WebAdapter
    from bot.metrics import Metrics

    store = await JobStore.open(Path(config.queue.store), Path(config.queue.outputs))
    queue = JobQueue(config, store)
    metrics = Metrics(queue)
    web = WebAdapter(config, queue, metrics=metrics) if config.web.enabled else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await queue.start()
    try:
        bound = await web.start(port) if web else None
    except OSError as exc:
        await queue.close(grace=0)
        await store.close()
        from engine.errors import ConfigError

        raise ConfigError(
            f"Cannot listen on {config.web.host}:{config.web.port if port is None else port} ({exc.strerror}); "
            "set [web] port to a free port or stop the program using it."
        ) from None
    print(summary(config, web_url=f"http://{config.web.host}:{bound}/" if bound else None), flush=True)
    keeper = asyncio.create_task(housekeeping(store, config), name="easelbot-housekeeping")
    await stop.wait()
    print(f"easelbot stopping: finishing the running batch (up to {config.queue.shutdown_grace_s:g} s)", flush=True)
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper
    if web:
        await web.stop()
    await queue.close()
    await store.close()
    print("easelbot stopped; queued jobs are kept and run at the next start", flush=True)
    return 0


def demo_config(config: Config, home: Path) -> Config:
    """The offline demo: the tiny model on this machine, store and results under `home`, playground on loopback."""
    import msgspec

    engine = msgspec.structs.replace(
        config.engine, default_model="tiny", default_upscaler="tiny", offline=True, preload=["tiny"]
    )
    queue = msgspec.structs.replace(
        config.queue, store=str(home / "easelbot.db"), outputs=str(home / "outputs"), engine_socket=""
    )
    web = msgspec.structs.replace(config.web, enabled=True, host="127.0.0.1")
    return msgspec.structs.replace(config, engine=engine, queue=queue, web=web)
