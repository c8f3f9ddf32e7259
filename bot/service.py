"""`easelbot run`: the long-running bot process (store, queue, engine child, adapters), stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from bot.config import Config
from bot.queue import EngineFactory, JobQueue
from bot.store import JobStore
from engine.errors import ConfigError

if TYPE_CHECKING:
    from bot.adapters.web import WebAdapter

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
        try:
            deleted = await store.prune(max_age_s=max_age, max_bytes=max_bytes)
        except Exception:  # a locked database, an unreadable file: try again next time, never stop retention
            log.exception("retention: this pass failed; the next runs in %g s", interval)
        else:
            if deleted:
                log.info("retention: deleted %d old result files", deleted)
        await asyncio.sleep(interval)


def summary(config: Config, web_url: str | None = None) -> str:
    """The start-up summary: where jobs live, which engine, which models, which limits, which adapters."""
    queue, limits = config.queue, config.limits
    if config.redis.enabled:
        from engine.redis_protocol import mask_url, redis_url

        try:
            where = mask_url(redis_url())
        except ConfigError:
            where = "EASELBOT_REDIS_URL (not set)"
        engine = f"workers through Redis at {where}"
    else:
        engine = f"standalone at {queue.engine_socket}" if queue.engine_socket else "child process"
    from bot.preflight import weights

    models = ", ".join(
        f"{name} ({spec.kind}{' + LoRA' if spec.lora else ''}"
        f"{'' if config.redis.enabled else ', ' + weights(config, spec, name).label})"  # workers hold their own
        for name, spec in sorted(config.models.items())
    )
    adapters = [f"web playground and API at {web_url}" if web_url else "web disabled"]
    if config.discord.enabled:
        scope = (
            f"commands synced to guild {config.discord.dev_guild}" if config.discord.dev_guild else "global commands"
        )
        adapters.append(f"Discord ({scope})")
    if config.slack.enabled:
        mode = (
            "Socket Mode"
            if config.slack.mode == "socket"
            else f"HTTP on {config.slack.host}:{config.slack.port}{config.slack.path}"
        )
        adapters.append(f"Slack ({mode})")
    return "\n".join(
        [
            "easelbot starting",
            f"  store:    {Path(queue.store).resolve()} (results in {Path(queue.outputs).resolve()})",
            f"  engine:   {engine}, device {config.engine.device}, dtype {config.engine.dtype}",
            f"  models:   {models}; default {config.engine.default_model}, upscaler {config.engine.default_upscaler}",
            f"  batching: up to {queue.max_batch_images} images, waiting at most {queue.max_wait_ms} ms",
            f"  speed:    {_speed(config)}",
            f"  limits:   {queue.max_queued_per_user} jobs a user, {queue.max_queue_length} in all, "
            f"{queue.max_images_per_user_per_hour or 'unlimited'} images a user an hour, "
            f"{limits.max_width}x{limits.max_height} max, {queue.job_timeout_s:g} s a job",
            f"  adapters: {'; '.join(adapters)}",
        ]
    )


def _speed(config: Config) -> str:
    """The [engine.speed] choices in one line (`auto` is decided by the engine: on for a CUDA GPU)."""
    speed = config.engine.speed
    if speed.compile is False or not speed.sizes or not speed.batches:
        compiled = "compile off"
    else:
        sizes = ", ".join(f"{width}x{height}" for width, height in speed.sizes)
        rows = "/".join(str(n) for n in speed.batches)
        when = "on a GPU" if speed.compile == "auto" else "on"
        compiled = f"compile {when} ({speed.compile_mode}) for {sizes} x {rows} UNet rows, before ready"
    layout = ", ".join(
        f"{name} {'auto' if value == 'auto' else 'on' if value else 'off'}"
        for name, value in (("channels-last", speed.channels_last), ("fused QKV", speed.fuse_qkv))
    )
    return f"{compiled}; {layout}; float16 VAE {'on' if speed.vae_fp16 else 'off'}"


def secret(name: str, why: str) -> str:
    """A secret from the environment, or a ConfigError saying which variable to set (the value is never logged)."""
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(f"{why}, but the environment variable {name} is not set. Set it to the token and restart.")
    return value


class Adapter(Protocol):
    """A chat or web front end: started after the queue, stopped before it."""

    async def start(self) -> None:
        """Connect and begin answering; raise ConfigError or EaselError when it cannot."""

    async def stop(self) -> None:
        """Stop answering; jobs already queued are kept."""


class Service:
    """The long-running composition: store, queue (with its engine) and every enabled adapter, built once."""

    def __init__(self, config: Config, *, port: int | None = None, engine_factory: EngineFactory | None = None) -> None:
        self.config = config
        self.port = port
        self.engine_factory = engine_factory
        self.store: JobStore | None = None
        self.queue: JobQueue | None = None
        self.web: WebAdapter | None = None
        self.web_url: str | None = None
        self.adapters: list[Adapter] = []
        self._keeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the store, start the queue and the adapters; on failure, undo what was started."""
        from bot.adapters.web import WebAdapter
        from bot.metrics import Metrics

        config = self.config
        self.store = await JobStore.open(Path(config.queue.store), Path(config.queue.outputs))
        try:
            self.queue = JobQueue(config, self.store, self.engine_factory)
            # Adapters listen before queue.start(), so the results it hands over again reach them.
            if config.web.enabled:
                self.web = WebAdapter(config, self.queue, metrics=Metrics(self.queue))
            chat = self._chat_adapters(self.queue)
            await self.queue.start()
            if self.web is not None:
                try:
                    bound = await self.web.start(self.port)
                except OSError as exc:
                    port = config.web.port if self.port is None else self.port
                    raise ConfigError(
                        f"Cannot listen on {config.web.host}:{port} ({exc.strerror}); "
                        "set [web] port (`--port` for the demo) to a free port or stop the program using it."
                    ) from None
                host = f"[{config.web.host}]" if ":" in config.web.host else config.web.host  # IPv6 in brackets
                self.web_url = f"http://{host}:{bound}/"
            for adapter in chat:
                await adapter.start()
                self.adapters.append(adapter)
        except BaseException:
            await self.stop(grace=0)
            raise
        self._keeper = asyncio.create_task(
            housekeeping(self.store, config, HOUSEKEEPING_INTERVAL_S), name="easelbot-housekeeping"
        )

    def _chat_adapters(self, queue: JobQueue) -> list[Adapter]:
        config = self.config
        adapters: list[Adapter] = []
        if config.discord.enabled:
            token = secret("DISCORD_TOKEN", "[discord] enabled = true")
            from bot.adapters.discord import DiscordAdapter

            adapters.append(DiscordAdapter(config, queue, token=token))
        if config.slack.enabled:
            why = "[slack] enabled = true"
            bot_token = secret("SLACK_BOT_TOKEN", why)
            if config.slack.mode == "socket":
                extra = {"app_token": secret("SLACK_APP_TOKEN", why + " with mode = socket")}
            else:
                extra = {"signing_secret": secret("SLACK_SIGNING_SECRET", why + " with mode = http")}
            from bot.adapters.slack import SlackAdapter

            adapters.append(SlackAdapter(config, queue, bot_token=bot_token, **extra))
        return adapters

    async def stop(self, grace: float | None = None) -> None:
        """Stop the adapters (newest first), let the running batch finish within `grace`, close the store."""
        if self._keeper is not None:
            self._keeper.cancel()
            try:
                await self._keeper
            except asyncio.CancelledError:
                pass
            except Exception:  # it logs its own errors; this is a safety net so that shutdown always goes on
                log.exception("the retention task had failed")
            self._keeper = None
        for adapter in reversed(self.adapters):
            try:
                await adapter.stop()
            except Exception:
                log.exception("stopping %s failed", type(adapter).__name__)
        self.adapters.clear()
        try:
            if self.web is not None:
                try:
                    await self.web.stop()
                except Exception:  # still let the running batch finish and close the store
                    log.exception("stopping the web server failed")
                self.web = None
            if self.queue is not None:
                await self.queue.close(grace)
                self.queue = None
        finally:
            if self.store is not None:
                await self.store.close()
                self.store = None


async def run_service(config: Config, *, port: int | None = None) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully within `queue.shutdown_grace_s`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = Service(config, port=port)
    await service.start()
    print(summary(config, web_url=service.web_url), flush=True)
    await stop.wait()
    print(f"easelbot stopping: finishing the running batch (up to {config.queue.shutdown_grace_s:g} s)", flush=True)
    await service.stop()
    print("easelbot stopped; queued jobs are kept and run at the next start", flush=True)
    return 0


def demo_config(config: Config, home: Path) -> Config:
    """The offline demo: the tiny model on this machine, store and results under `home`, playground on loopback,
    and nothing else: no Discord, Slack or Redis workers even where the config (say the Docker image's) enables
    them, so the demo never logs in with real tokens or sends work to production workers.
    Configured models whose weights are already here stay available; the others are left out (offline, they
    could only fail), so a request for one is refused at once with the models that work."""
    import msgspec

    from bot.preflight import weights

    engine = msgspec.structs.replace(
        config.engine, default_model="tiny", default_upscaler="tiny", offline=True, preload=["tiny"]
    )
    config = msgspec.structs.replace(config, engine=engine)
    models = {name: spec for name, spec in config.models.items() if weights(config, spec, name).ready}
    queue = msgspec.structs.replace(
        config.queue, store=str(home / "easelbot.db"), outputs=str(home / "outputs"), engine_socket=""
    )
    web = msgspec.structs.replace(config.web, enabled=True, host="127.0.0.1")
    return msgspec.structs.replace(
        config,
        queue=queue,
        web=web,
        models=models,
        discord=msgspec.structs.replace(config.discord, enabled=False),
        slack=msgspec.structs.replace(config.slack, enabled=False),
        redis=msgspec.structs.replace(config.redis, enabled=False),
    )
