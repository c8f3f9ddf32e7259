"""Logging for the long-running bot: readable text for a terminal, or one JSON object a line.

Records about a job carry `job_id` (pass `extra={"job_id": ...}`), so a log pipeline can follow one
job from submit to delivery. Secrets are never passed to the logger.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_CONTEXT = ("job_id", "batch_id", "platform", "user")


class JsonFormatter(logging.Formatter):
    """`{"time": ..., "level": ..., "logger": ..., "message": ..., "job_id": ...}` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT:
            value = record.__dict__.get(key)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2026-11-23 12:00:00 INFO bot.queue: message [job 1a2b3c4d]`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = record.__dict__.get("job_id")
        return f"{text} [job {job_id}]" if job_id else text


def configure(level: str, fmt: str) -> None:
    """Send the process's logs to stderr in `fmt` ("text" or "json") at `level`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
