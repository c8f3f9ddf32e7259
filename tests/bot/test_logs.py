"""Log formats of the long-running bot."""

from __future__ import annotations

import json
import logging

from bot.logs import JsonFormatter, TextFormatter


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("bot.queue", logging.INFO, __file__, 1, "queued %s", ("txt2img",), None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_the_job_id() -> None:
    """JSON format writes one object per record with time, level, logger, message and the job id."""
    entry = json.loads(JsonFormatter().format(_record(job_id="1a2b3c4d", platform="web")))
    assert entry["message"] == "queued txt2img"
    assert entry["level"] == "info"
    assert entry["logger"] == "bot.queue"
    assert entry["job_id"] == "1a2b3c4d"
    assert entry["platform"] == "web"
    assert entry["time"].endswith("Z")


def test_text_lines_end_with_the_job_id_when_there_is_one() -> None:
    """Text format appends [job ID] to records about a job and nothing otherwise."""
    assert TextFormatter().format(_record(job_id="1a2b3c4d")).endswith("queued txt2img [job 1a2b3c4d]")
    assert TextFormatter().format(_record()).endswith("queued txt2img")
