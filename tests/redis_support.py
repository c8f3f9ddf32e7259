"""A real `redis-server` on 127.0.0.1 for tests, and engine workers as real subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else ""
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """redis-server in a temp folder with AOF on (fsync always), so a restart keeps everything."""

    def __init__(self, directory: Path, password: str = "") -> None:
        self.directory = directory
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            REDIS_SERVER,
            "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.directory),
            "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--loglevel", "warning",
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self, *, kill: bool = False) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.process.wait(timeout=15)
        self.process = None

    def wipe(self) -> None:
        """Restart with no data at all, as a Redis without persistence does."""
        self.stop(kill=True)
        for path in self.directory.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


class Worker:
    """`python -m bot.cli engine --redis` as a subprocess, logging its batches to its own file."""

    def __init__(
        self,
        root: Path,
        name: str,
        url: str,
        config: Path,
        *,
        factory: str = "tests.fakes:fake_engine",
        models: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log = root / f"{name}.batches.jsonl"
        self.output = root / f"{name}.log"
        args = [sys.executable, "-m", "bot.cli", "--config", str(config), "engine", "--redis", "--worker-id", name]
        if factory:
            args += ["--factory", factory]
        if models:
            args += ["--models", models]
        environment = {
            **os.environ,
            "EASELBOT_REDIS_URL": url,
            "EASELBOT_FAKE_LOG": str(self.log),
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        }
        with self.output.open("ab") as out:
            self.process = subprocess.Popen(args, cwd=ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT)

    def batches(self) -> list[list[str]]:
        import json

        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def jobs(self) -> list[str]:
        return [job for batch in self.batches() for job in batch]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=15)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def buggy_engine(settings: Any) -> tuple[Any, Any]:
    """Factory for a worker whose engine raises (a bug) on prompts containing `bug`, after starting them."""
    from engine.protocol import Started
    from tests.fakes import FakeRunner, fake_engine

    class Buggy(FakeRunner):
        def run(self, batch: Any, emit: Any, cancelled: Any) -> None:
            if any("bug" in request.prompt for request in batch):
                for request in batch:
                    emit(Started(job_id=request.job_id))
                raise RuntimeError("a bug in the engine")
            super().run(batch, emit, cancelled)

    _, ready = fake_engine(settings)
    return Buggy(), ready


def validating_engine(settings: Any) -> tuple[Any, Any]:
    """Factory for a worker whose engine refuses (bad_input) a request beyond its own [limits], as the real
    engine does."""
    from engine.errors import FailureReason, UserError
    from engine.protocol import Failed, validate
    from tests.fakes import FakeRunner, fake_engine

    class Validating(FakeRunner):
        def run(self, batch: Any, emit: Any, cancelled: Any) -> None:
            fits = []
            for request in batch:
                try:
                    validate(request, settings.limits)
                    fits.append(request)
                except UserError as exc:
                    emit(Failed(job_id=request.job_id, reason=FailureReason.BAD_INPUT, message=str(exc)))
            if fits:
                super().run(fits, emit, cancelled)

    _, ready = fake_engine(settings)
    return Validating(), ready
