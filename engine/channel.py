"""The byte channel between the bot and an engine process (imports no torch).

Frames are a 4-byte big-endian length followed by one msgpack message. The bot sends `Hello`
(protocol version and settings) first, then `RunBatch`, `Cancel` and `Shutdown` commands; the
engine answers `Ready` (or `Fatal`), then per-job events (engine.protocol) and, per batch,
`BatchDone` as soon as its GPU work is over and the engine can take the next batch. A batch's
Progress previews and Done/Failed events may still follow its `BatchDone` (the engine encodes PNGs
off the GPU loop); each job's own events stay in order and every job still ends with one Done or
Failed. The same framing runs over a socketpair to a child process or over a Unix socket to a
standalone `easelbot engine`.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import msgspec

from engine.config import Settings
from engine.protocol import PROTOCOL_VERSION, Done, Failed, Progress, Request, Started

MAX_FRAME = 512 * 1024 * 1024
"""Largest frame accepted (a batch of full-size results with previews fits easily)."""

_HEADER = struct.Struct(">I")


class Hello(msgspec.Struct, frozen=True, kw_only=True, tag="hello"):
    """First frame from the bot: what the engine should load."""

    version: int
    settings: Settings


class RunBatch(msgspec.Struct, frozen=True, kw_only=True, tag="run"):
    """Run these requests (one batch key) and report every job."""

    batch_id: int
    requests: list[Request]


class Cancel(msgspec.Struct, frozen=True, kw_only=True, tag="cancel"):
    """Stop this job at its next denoising step."""

    job_id: str


class Shutdown(msgspec.Struct, frozen=True, kw_only=True, tag="shutdown"):
    """Finish the current batch, then exit."""


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag="ready"):
    """The engine is up; the named models are loaded."""

    version: int
    device: str
    dtype: str
    models: list[str]
    seconds: float
    """Start-up time, model loading included."""
    compiled: list[str] = msgspec.field(default_factory=list)
    """UNet shape buckets compiled at start-up (`WIDTHxHEIGHT*ROWS`); empty when nothing is compiled."""
    warmup_seconds: float = 0.0
    """The part of `seconds` spent compiling them."""


class Fatal(msgspec.Struct, frozen=True, kw_only=True, tag="fatal"):
    """The engine cannot start or go on; the message says why."""

    message: str


class BatchDone(msgspec.Struct, frozen=True, kw_only=True, tag="batch_done"):
    """The GPU is free for the next batch; this batch's jobs' Done or Failed events may still follow."""

    batch_id: int
    peak_memory_bytes: int | None = None
    """Peak GPU memory the batch used (None on a CPU)."""
    gpu_seconds: float | None = None
    """How long the batch kept the GPU loop busy (None from an engine that does not say)."""


Command = Hello | RunBatch | Cancel | Shutdown
EngineMessage = Started | Progress | Done | Failed | Ready | Fatal | BatchDone

_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(Command)
_message_decoder = msgspec.msgpack.Decoder(EngineMessage)


class ChannelClosed(Exception):
    """The other end went away."""


class FrameTooLarge(ChannelClosed):
    """A frame's header announced more than MAX_FRAME bytes: the connection cannot go on."""


def frame(message: Command | EngineMessage) -> bytes:
    """One framed message."""
    payload = _encoder.encode(message)
    return _HEADER.pack(len(payload)) + payload


def decode_command(payload: bytes) -> Command:
    """Parse a command frame's payload."""
    command: Command = _command_decoder.decode(payload)
    return command


def decode_message(payload: bytes) -> EngineMessage:
    """Parse an engine message frame's payload."""
    message: EngineMessage = _message_decoder.decode(payload)
    return message


def hello(settings: Settings) -> Hello:
    """The first frame for an engine with these settings."""
    return Hello(version=PROTOCOL_VERSION, settings=settings)


def _check_size(size: int) -> int:
    if size > MAX_FRAME:
        raise FrameTooLarge(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
    return size


def read_frame(sock: socket.socket) -> bytes:
    """Blocking read of one frame's payload (engine side)."""
    size = _check_size(_HEADER.unpack(_recv_exactly(sock, _HEADER.size))[0])
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(min(size - len(chunks), 1 << 20))
        if not chunk:
            raise ChannelClosed("connection closed")
        chunks += chunk
    return bytes(chunks)


async def read_frame_async(reader: asyncio.StreamReader) -> bytes:
    """Read one frame's payload (bot side)."""
    try:
        header = await reader.readexactly(_HEADER.size)
        return await reader.readexactly(_check_size(_HEADER.unpack(header)[0]))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise ChannelClosed("engine connection closed") from exc
