"""Request bodies of the HTTP API: JSON or multipart, read within limits, checked and turned into options.

Every problem becomes a JsonError (or a UserError, which the web adapter answers with 400) that names the
field and says what to send instead; nothing is coerced or clamped silently. A JSON body's values must have
the types the OpenAPI document gives (`"width": "512"` is refused); a multipart form's fields are all text,
so there numbers and flags are read from their text.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import BodyPartReader, web

from bot.commands import Options, parse_prompt
from engine.errors import UserError
from engine.protocol import Task

COMMANDS = {"imagine": Task.TXT2IMG, "edit": Task.IMG2IMG, "upscale": Task.UPSCALE}
FIELDS = {
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance",
    "seed",
    "count",
    "model",
    "scheduler",
    "strength",
    "noise_level",
}
"""The option fields of a job submitted without `command`."""
JOB_FIELDS = FIELDS | {"command", "task", "compare"}
"""Every field `POST /api/v1/jobs` takes besides the `image` and `mask` files."""
FILES = ("image", "mask")
FORM_PARTS_MAX = 32
"""Parts one multipart body may have."""
FORM_TEXT_MAX = 16_384
"""Bytes one multipart text field may have."""

_WHOLE = re.compile(r"\s*[+-]?\d+\s*")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


@dataclass(frozen=True, kw_only=True)
class Body:
    """A request body, read and checked."""

    fields: dict[str, Any]
    """The fields besides the files: JSON values, or text for a form."""
    files: dict[str, bytes]
    """`image` and `mask` bytes, from multipart files or JSON `image_base64`/`mask_base64`."""
    form: bool
    """A multipart form (every field is text), not a JSON object."""


class JsonError(web.HTTPException):
    """An HTTP error with a JSON body `{"error": message}`."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        super().__init__(text=json.dumps({"error": message}), content_type="application/json", headers=headers)


async def read_body(request: web.Request, *, known: set[str], max_file: int, max_total: int) -> Body:
    """The fields and files of a JSON or multipart body; JsonError for one that is malformed or too large.

    `known` lists the field names this endpoint takes; `image`/`mask` files (multipart, or `image_base64`
    and `mask_base64` in JSON) of at most `max_file` bytes each are taken when `known` holds their names.
    """
    if request.content_type.startswith("multipart/"):
        fields, files = await _read_multipart(request, known=known, max_file=max_file, max_total=max_total)
        return Body(fields=fields, files=files, form=True)
    if not request.can_read_body:
        return Body(fields={}, files={}, form=False)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise JsonError(400, "The body is not valid JSON.") from None
    except LookupError:  # an unknown charset in Content-Type
        raise JsonError(400, "The body's charset is unknown; send JSON as UTF-8 (`application/json`).") from None
    if not isinstance(body, dict):
        raise JsonError(400, "The body must be a JSON object.")
    files = {}
    for name in FILES:
        if name not in known:
            continue
        if name in body:
            raise JsonError(
                400,
                f"`{name}` is the name of a multipart file; in a JSON body send the file as `{name}_base64` "
                "(its bytes in base64).",
            )
        encoded = body.pop(f"{name}_base64", None)
        if encoded is not None:
            if not isinstance(encoded, str):
                raise JsonError(400, f"`{name}_base64` must be a base64 string.")
            try:
                files[name] = base64.b64decode(encoded, validate=True)
            except ValueError:
                raise JsonError(400, f"`{name}_base64` is not valid base64.") from None
            _check_file(name, len(files[name]), max_file)
    _check_known(body, {f"{name}_base64" if name in FILES else name for name in known})
    return Body(fields=body, files=files, form=False)


async def _read_multipart(
    request: web.Request, *, known: set[str], max_file: int, max_total: int
) -> tuple[dict[str, Any], dict[str, bytes]]:
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    total = 0
    try:
        reader = await request.multipart()
        parts = 0
        async for part in reader:
            parts += 1
            if parts > FORM_PARTS_MAX:
                raise JsonError(400, f"The form has more than {FORM_PARTS_MAX} parts; send only the fields you need.")
            if not isinstance(part, BodyPartReader) or not part.name:
                raise JsonError(
                    400, "Every part of the form needs a name (`Content-Disposition: form-data; name=...`)."
                )
            is_file = part.name in FILES and part.name in known
            if not is_file:
                _check_known({part.name: None}, known)
            data = bytearray()
            while chunk := await part.read_chunk(1 << 16):
                data += chunk
                total += len(chunk)
                if is_file:
                    _check_file(part.name, len(data), max_file)
                elif len(data) > FORM_TEXT_MAX:
                    raise JsonError(413, f"The field `{part.name}` is longer than {FORM_TEXT_MAX // 1024} KB.")
                if total > max_total:
                    raise JsonError(413, f"The form is larger than {max_total / 1e6:g} MB in all; send smaller files.")
            if is_file:
                if data:
                    files[part.name] = bytes(data)
            else:
                try:
                    fields[part.name] = bytes(part.decode(bytes(data))).decode(part.get_charset(default="utf-8"))
                except (ValueError, LookupError, RuntimeError):
                    raise JsonError(400, f"The field `{part.name}` is not UTF-8 text.") from None
    except (ValueError, AssertionError) as exc:
        raise JsonError(400, f"The multipart body could not be read: {exc}.") from None
    return fields, files


def _check_known(fields: dict[str, Any], known: set[str]) -> None:
    unknown = set(fields) - known
    if unknown:
        raise JsonError(400, f"Unknown field `{sorted(unknown)[0]}`. Known fields: {', '.join(sorted(known))}.")


def _check_file(name: str, size: int, limit: int) -> None:
    if size > limit:
        raise JsonError(413, f"The {name} is larger than {limit / 1e6:g} MB; send a smaller file.")


def job_options(fields: dict[str, Any], *, form: bool) -> tuple[Task, Options, bool]:
    """The task, options and `compare` flag of a submitted job's fields (`form`: text fields of a multipart form,
    else JSON values); UserError says what to change."""
    compare = flag("compare", fields.get("compare", False), form=form)
    if "command" in fields:
        command = fields["command"]
        besides = set(fields) - {"command", "compare"}
        if besides:
            raise UserError(
                f"`{sorted(besides)[0]}` cannot be sent with `command`: put options into the command "
                "(`/imagine a fox --steps 20 --size 640x512`), or send fields without `command`."
            )
        line = text("command", command).strip().lstrip("/").strip()
        if not line:
            raise UserError(
                "The command is empty. Send one such as `/imagine a red fox` (or `/edit` and `/upscale` with an image)."
            )
        name, _, rest = line.partition(" ")
        if name.lower() not in COMMANDS:
            raise UserError(f"Unknown command `{name}`. Use /imagine, /edit or /upscale, e.g. `/imagine a red fox`.")
        return COMMANDS[name.lower()], parse_prompt(rest), compare
    try:
        task = Task(text("task", fields.get("task", "txt2img")))
    except ValueError:
        raise UserError("`task` must be txt2img, img2img, inpaint or upscale.") from None
    options = Options(
        prompt=text("prompt", fields.get("prompt", "")),
        negative=text("negative_prompt", fields.get("negative_prompt", "")),
    )
    for name in ("width", "height", "steps", "seed", "count", "noise_level"):
        if name in fields:
            setattr(options, name, whole(name, fields[name], form=form))
    for name in ("guidance", "strength"):
        if name in fields:
            setattr(options, name, number(name, fields[name], form=form))
    for name in ("model", "scheduler"):
        if name in fields:
            setattr(options, name, text(name, fields[name]) or None)
    _check_applies(task, {name for name in fields if name != "compare" or compare})
    return (Task.IMG2IMG if task is Task.INPAINT else task), options, compare


_ONLY_FOR = {
    "strength": (Task.IMG2IMG, Task.INPAINT),
    "noise_level": (Task.UPSCALE,),
    "compare": (Task.UPSCALE,),
}
"""Fields that mean something for some tasks only: anywhere else they are refused, not silently dropped."""


def _check_applies(task: Task, fields: set[str]) -> None:
    for name, tasks in _ONLY_FOR.items():
        if name in fields and task not in tasks:
            where = " and ".join(str(t) for t in tasks)
            raise UserError(f"`{name}` applies only to {where}, not {task}; leave it out.")
    if task is not Task.TXT2IMG and ("width" in fields) != ("height" in fields):
        raise UserError(
            "Send both `width` and `height` for a job with an image, or neither to follow the image's own size."
        )


def _shown(value: Any) -> str:
    try:
        return json.dumps(value)
    except ValueError:
        return repr(value)


def text(name: str, value: Any) -> str:
    """A text field; UserError for anything else (null included: leave the field out instead)."""
    if isinstance(value, str):
        return value
    raise UserError(f"`{name}` must be text, not {_shown(value)}; leave it out for the default.")


def _unquote(value: Any, form: bool) -> str:
    """For a JSON string where a number or a boolean belongs: say to send the value itself."""
    return " (a string); send the value without quotes" if isinstance(value, str) and not form else ""


def whole(name: str, value: Any, *, form: bool) -> int:
    """An integer field: in JSON an integer (or an integral number such as 4.0); in a form, its digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if form and isinstance(value, str) and _WHOLE.fullmatch(value):
        return int(value)
    raise UserError(f"`{name}` must be an integer, not {_shown(value)}{_unquote(value, form)}.")


def number(name: str, value: Any, *, form: bool) -> float:
    """A finite number field: in JSON a number; in a form, the text of one."""
    result: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        result = float(value)
    elif form and isinstance(value, str):
        try:
            result = float(value)
        except ValueError:
            result = None
    if result is None or not math.isfinite(result):
        raise UserError(f"`{name}` must be a finite number, not {_shown(value)}{_unquote(value, form)}.")
    return result


def flag(name: str, value: Any, *, form: bool) -> bool:
    """A yes/no field: in JSON true or false; in a form, 1/0, true/false, yes/no or on/off (or empty: no)."""
    if isinstance(value, bool):
        return value
    if form and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise UserError(f"`{name}` must be true or false, not {_shown(value)}{_unquote(value, form)}.")
