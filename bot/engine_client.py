"""The bot's end of the engine channel: start a child engine process (or connect to a standalone
one) and exchange framed messages with it. The bot process never imports torch: the engine runs
in its own interpreter (`python -m engine.worker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys

import msgspec

from engine.channel import (
    ChannelClosed,
    Command,
    EngineMessage,
    Fatal,
    Ready,
    Shutdown,
    decode_message,
    frame,
    hello,
    read_frame_async,
)
from engine.config import Settings
from engine.errors import EngineCrashed, EngineError

log = logging.getLogger(__name__)


class EngineProcess:
    """One engine: a child process over a socketpair, or a standalone engine on a Unix socket."""

    def __init__(self, settings: Settings, *, socket_path: str = "", factory: str = "") -> None:
        self.settings = settings
        self.socket_path = socket_path
        self.factory = factory
        self.process: asyncio.subprocess.Process | None = None
        self.ready: Ready | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def pid(self) -> int | None:
        """The child's process id (None for a standalone engine)."""
        return self.process.pid if self.process else None

    async def start(self, timeout: float) -> Ready:
        """Start (or connect), send the settings and wait for Ready; EngineError if it cannot start."""
        if self.socket_path:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError as exc:
                raise EngineError(
                    f"Cannot reach the engine at {self.socket_path} ({exc.strerror or exc}); "
                    f"start it with `easelbot engine --socket {self.socket_path}`."
                ) from None
        else:
            parent, child = socket.socketpair()
            args = [sys.executable, "-m", "engine.worker", "--fd", str(child.fileno())]
            if self.factory:
                args += ["--factory", self.factory]
            self.process = await asyncio.create_subprocess_exec(
                *args, pass_fds=[child.fileno()], stdin=asyncio.subprocess.DEVNULL, env=_engine_environment()
            )
            child.close()
            self._reader, self._writer = await asyncio.open_unix_connection(sock=parent)
        try:
            await self.send(hello(self.settings))
            message = await asyncio.wait_for(self.receive(), timeout)
        except TimeoutError:
            await self.kill()
            raise EngineError(f"The engine did not become ready within {timeout:g} s.") from None
        except ChannelClosed:
            await self.kill()
            raise EngineCrashed("The engine process exited during start-up; see its log above.") from None
        except msgspec.DecodeError as exc:
            await self.kill()
            raise EngineError(
                f"The engine's first message could not be read ({exc}). Are the bot and the engine "
                "the same easelbot release?"
            ) from None
        if isinstance(message, Fatal):
            await self.kill()
            raise EngineError(message.message)
        if not isinstance(message, Ready):
            await self.kill()
            raise EngineError(f"The engine answered {type(message).__name__} instead of Ready.")
        self.ready = message
        return message

    async def send(self, command: Command) -> None:
        """Send one command; ChannelClosed if the engine is gone."""
        if self._writer is None:
            raise ChannelClosed("engine not started")
        try:
            self._writer.write(frame(command))
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed("engine connection closed") from exc

    async def receive(self) -> EngineMessage:
        """The next message from the engine; ChannelClosed when it has gone away."""
        if self._reader is None:
            raise ChannelClosed("engine not started")
        return decode_message(await read_frame_async(self._reader))

    async def shutdown(self) -> None:
        """Ask the engine to finish its batch, send the results and exit (a standalone engine hangs up)."""
        with contextlib.suppress(ChannelClosed):
            await self.send(Shutdown())

    async def stop(self, grace: float) -> None:
        """Wait up to `grace` seconds for a child engine to exit (after `shutdown`), then kill it; a standalone
        engine is disconnected."""
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                log.warning("engine did not exit within %g s; killing it", grace)
        await self.kill()

    async def kill(self) -> None:
        """Stop the engine now (a standalone engine is only disconnected)."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()


def _engine_environment() -> dict[str, str]:
    """The bot's environment, with the ML libraries' console chatter off unless the operator set it."""
    quiet = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return {**quiet, **os.environ}
