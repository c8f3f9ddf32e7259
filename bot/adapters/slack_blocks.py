"""Block Kit for the Slack adapter: the progress message, the result message, the modals and help.

Plain dicts in Slack's JSON shape (tests parse every payload with slack_sdk's block models). Text is
Slack mrkdwn; user input is escaped where it is shown as mrkdwn.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from bot.chat import Button, button_label, describe, parameters, result_buttons
from bot.jobs import Job
from bot.queue import Update
from engine.images import ACCEPTED_TEXT
from engine.protocol import Task

Block = dict[str, Any]

IMAGE_FILETYPES = ["png", "jpg", "jpeg", "webp", "gif", "bmp"]
"""What the modals' file inputs accept (Slack checks the extension; the bot checks the bytes)."""

EDIT_VIEW = "easel_edit"
"""callback_id of the Edit modal (from `/edit` or the "Edit image" shortcut)."""
UPSCALE_VIEW = "easel_upscale"
"""callback_id of the Upscale modal (from `/upscale`)."""
EDIT_JOB_VIEW = "easel_edit_job"
"""callback_id of the modal behind a result's Edit button (new prompt, same settings)."""

HELP = """*easelbot* makes images on this community's GPU.
• `/imagine a red fox in the snow --ar 16:9 --n 4` makes images from a prompt.
  Options after the prompt: `--no TEXT` (negative prompt), `--ar W:H`, `--size WxH`, `--seed N`, \
`--steps N`, `--cfg X`, `--n 1-4`, `--model NAME`, `--sampler NAME`.
• `/edit [prompt]` opens a form to upload an image and describe the change (`--strength 0-1`).
• `/upscale` opens a form to upload an image to enlarge 4x (`--noise 0-350`).
• `/imagine-queue` lists your jobs with their place in the queue and when they should be done.
• On any message with an image: *More actions* (⋮) → *Upscale x4* or *Edit image*.
• Mention me with an image attached: `@easelbot upscale` or `@easelbot edit make it night` (any other text \
edits the image too).
Under each result: U1-U4 upscale an image, V1-V4 make a variation, Reroll tries new seeds, \
Edit changes the prompt, Delete removes it (the requester or a workspace admin)."""


def escape(text: str) -> str:
    """Text shown as mrkdwn, with Slack's three control characters escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def mrkdwn(text: str) -> str:
    """Convert the shared helpers' Markdown (`**bold**`) to Slack mrkdwn (`*bold*`)."""
    return text.replace("**", "*")


def _text(text: str, limit: int = 3000) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def section(text: str) -> Block:
    """A mrkdwn section (cut to Slack's 3,000 characters)."""
    return {"type": "section", "text": {"type": "mrkdwn", "text": _text(text)}}


def _context(text: str) -> Block:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": _text(text)}]}


def _button(button: Button, count: int) -> Block:
    element: Block = {
        "type": "button",
        "action_id": button.encode(),
        "text": {"type": "plain_text", "text": button_label(button, count)},
        "value": button.job_id,
    }
    if button.action == "delete":
        element["style"] = "danger"
        element["confirm"] = {
            "title": {"type": "plain_text", "text": "Delete this result?"},
            "text": {"type": "mrkdwn", "text": "The images and this message are removed for everyone."},
            "confirm": {"type": "plain_text", "text": "Delete"},
            "deny": {"type": "plain_text", "text": "Keep"},
            "style": "danger",
        }
    elif button.action == "cancel":
        element["style"] = "danger"
    return element


def headline(job: Job) -> str:
    """Who asked for what, as the first line of a job's messages."""
    return f"<@{job.requester.user_id}> *{escape(describe(job))}*"


def progress_blocks(update: Update, *, preview_file: str | None = None) -> list[Block]:
    """The placeholder while a job waits or runs: what it makes, the status, a preview, a Cancel button."""
    from bot.chat import status_line

    job = update.job
    blocks = [section(headline(job)), _context(status_line(update))]
    if preview_file:
        blocks.append({"type": "image", "slack_file": {"id": preview_file}, "alt_text": f"Preview of job {job.id}"})
    if not update.kind.final:
        blocks.append({"type": "actions", "elements": [_button(Button("cancel", job.id), 1)]})
    return blocks


def result_blocks(job: Job, posted: Collection[int], *, notice: str = "") -> list[Block]:
    """The message under uploaded results: the parameters and the result buttons. Upscale and Vary buttons
    come only for `posted`, the 1-based indexes of the images actually posted (not withheld, not lost)."""
    rows = parameters(job)
    text_rows = [(name, value) for name, value in rows if name in ("Prompt", "Negative")]
    field_rows = [(name, value) for name, value in rows if name not in ("Prompt", "Negative")]
    blocks = [section(headline(job))]
    blocks.append(section("\n".join(f"*{name}:* {escape(value)}" for name, value in text_rows)))
    for start in range(0, len(field_rows), 10):
        fields = [
            {"type": "mrkdwn", "text": _text(f"*{name}*\n{escape(value)}", 2000)}
            for name, value in field_rows[start : start + 10]
        ]
        blocks.append({"type": "section", "fields": fields})
    if notice:
        blocks.append(_context(notice))
    count = sum(1 for image in job.images if image.kind == "result")
    for row in result_buttons(job):
        elements = [_button(button, count) for button in row if button.index == 0 or button.index in posted]
        if elements:
            blocks.append({"type": "actions", "elements": elements})
    return blocks


def queue_blocks(text: str, job_ids: list[str]) -> list[Block]:
    """`/imagine-queue`: the listing, then a Cancel button for each of the user's waiting or running jobs."""
    result = [section(text)]
    buttons = [Button("cancel", job_id) for job_id in job_ids]
    for start in range(0, len(buttons), 5):
        elements = []
        for button in buttons[start : start + 5]:
            element = _button(button, 1)
            element["text"] = {"type": "plain_text", "text": f"Cancel {button.job_id}"}
            elements.append(element)
        result.append({"type": "actions", "elements": elements})
    return result


# ---- modals --------------------------------------------------------------------------------------------


def _plain(text: str) -> Block:
    return {"type": "plain_text", "text": text}


def _input(block_id: str, label: str, element: Block, *, optional: bool = False, hint: str = "") -> Block:
    block: Block = {"type": "input", "block_id": block_id, "label": _plain(label), "element": element}
    if optional:
        block["optional"] = True
    if hint:
        block["hint"] = _plain(hint)
    return block


def _file_input() -> Block:
    return _input(
        "image",
        "Image",
        {"type": "file_input", "action_id": "file", "filetypes": IMAGE_FILETYPES, "max_files": 1},
        hint=f"{ACCEPTED_TEXT}.",
    )


def _text_input(action: str, initial: str, placeholder: str, *, multiline: bool = False) -> Block:
    element: Block = {
        "type": "plain_text_input",
        "action_id": action,
        "multiline": multiline,
        "placeholder": _plain(placeholder),
    }
    if initial:
        element["initial_value"] = initial[:3000]
    return element


def _number_input(action: str, initial: str, minimum: str, maximum: str, *, decimal: bool) -> Block:
    return {
        "type": "number_input",
        "action_id": action,
        "is_decimal_allowed": decimal,
        "initial_value": initial,
        "min_value": minimum,
        "max_value": maximum,
    }


def _view(callback_id: str, title: str, submit: str, blocks: list[Block], metadata: str) -> Block:
    return {
        "type": "modal",
        "callback_id": callback_id,
        "title": _plain(title),
        "submit": _plain(submit),
        "close": _plain("Cancel"),
        "private_metadata": metadata,
        "blocks": blocks,
    }


def edit_view(metadata: str, *, prompt: str = "", file_name: str | None = None) -> Block:
    """The Edit modal: an image (or the one the shortcut picked), what to change, and the strength."""
    blocks = [_file_input()] if file_name is None else [_context(f"Editing `{escape(file_name)}`.")]
    blocks += [
        _input(
            "prompt",
            "What should the image become?",
            _text_input("value", prompt, "the same scene at night, snow falling", multiline=True),
            hint="Inline options work here too, e.g. --seed 5 --steps 30.",
        ),
        _input("negative", "Avoid", _text_input("value", "", "blurry, text"), optional=True),
        _input(
            "strength",
            "Strength",
            _number_input("value", "0.75", "0.05", "1", decimal=True),
            optional=True,
            hint="How much may change: 0.3 keeps the picture, 0.9 keeps little more than its colours.",
        ),
    ]
    return _view(EDIT_VIEW, "Edit an image", "Edit", blocks, metadata)


def upscale_view(metadata: str, *, prompt: str = "") -> Block:
    """The Upscale modal: an image, an optional prompt and the noise level."""
    blocks = [
        _file_input(),
        _input(
            "prompt",
            "Describe the image (optional)",
            _text_input("value", prompt, "a red fox in the snow"),
            optional=True,
            hint="A short description helps the upscaler add fitting detail.",
        ),
        _input(
            "noise",
            "Noise level",
            _number_input("value", "20", "0", "350", decimal=False),
            optional=True,
            hint="Higher values invent more detail and keep less of the original.",
        ),
    ]
    return _view(UPSCALE_VIEW, "Upscale x4", "Upscale", blocks, metadata)


def edit_job_view(job: Job, metadata: str) -> Block:
    """The modal behind a result's Edit button: the job's prompts to change, every other setting kept."""
    r = job.request
    blocks = [
        _context(f"Job `{job.id}`: {escape(describe(job))}. Size, steps and model stay the same; a new seed is used."),
        _input(
            "prompt",
            "Prompt",
            _text_input("value", r.prompt, "a red fox in the snow", multiline=True),
            optional=r.task is Task.UPSCALE,  # an upscale needs no prompt (as on Discord)
        ),
        _input("negative", "Avoid", _text_input("value", r.negative_prompt, "blurry, text"), optional=True),
    ]
    return _view(EDIT_JOB_VIEW, "Edit the prompt", "Make it", blocks, metadata)
