"""What the Slack adapter reads from Slack's payloads: who asked and where to answer, the text as typed,
the files, a modal's values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from bot.adapters.slack_blocks import IMAGE_FILETYPES
from bot.adapters.slack_delivery import PLATFORM, SlackReply
from bot.jobs import Requester

_MENTION = re.compile(r"<@[A-Z0-9]+(?:\|[^>]*)?>")


@dataclass(frozen=True, kw_only=True)
class Origin:
    """Who made a request and where to answer them."""

    channel: str
    user: str
    team: str
    name: str = ""
    thread: str | None = None
    response_url: str | None = None
    """Slack's URL for ephemeral answers to this interaction, when it gave one."""

    @property
    def requester(self) -> Requester:
        """The platform-neutral requester."""
        return Requester(
            platform=PLATFORM, user_id=self.user, guild_id=self.team, channel_id=self.channel, display_name=self.name
        )

    def reply(self) -> SlackReply:
        """A reply handle for a job started here."""
        return SlackReply(channel=self.channel, user=self.user, team=self.team, thread=self.thread)


def command_origin(command: dict[str, Any]) -> Origin:
    """Where a slash command came from."""
    return Origin(
        channel=str(command.get("channel_id", "")),
        user=str(command.get("user_id", "")),
        team=str(command.get("team_id", "")),
        name=str(command.get("user_name", "")),
        response_url=command.get("response_url"),
    )


def shortcut_origin(body: dict[str, Any]) -> Origin:
    """Where a message shortcut was used; answers go into the message's thread."""
    message = body.get("message") or {}
    user = body.get("user") or {}
    return Origin(
        channel=str((body.get("channel") or {}).get("id", "")),
        user=str(user.get("id", "")),
        team=str(user.get("team_id") or (body.get("team") or {}).get("id") or ""),
        name=str(user.get("name") or user.get("username") or ""),
        thread=message.get("thread_ts") or message.get("ts"),
        response_url=body.get("response_url"),
    )


def view_origin(body: dict[str, Any], view: dict[str, Any]) -> tuple[Origin, dict[str, Any]]:
    """Where a submitted modal was opened (from its private_metadata), and that metadata."""
    try:
        metadata = json.loads(view.get("private_metadata") or "{}")
    except ValueError:
        metadata = {}
    user = body.get("user") or {}
    origin = Origin(
        channel=str(metadata.get("channel", "")),
        user=str(user.get("id", "")),
        team=str(user.get("team_id") or (body.get("team") or {}).get("id") or ""),
        name=str(user.get("name") or user.get("username") or ""),
        thread=metadata.get("thread"),
    )
    return origin, metadata


def mention_origin(event: dict[str, Any], body: dict[str, Any]) -> Origin:
    """Where a mention was made; answers go into its thread."""
    return Origin(
        channel=str(event.get("channel", "")),
        user=str(event.get("user", "")),
        team=str(event.get("team") or body.get("team_id") or ""),
        thread=str(event.get("thread_ts") or event.get("ts") or "") or None,
    )


def button_origin(body: dict[str, Any]) -> Origin:
    """Where a button was clicked; answers go where its message is."""
    channel = body.get("channel") or {}
    message = body.get("message") or {}
    user = body.get("user") or {}
    return Origin(
        channel=str(channel.get("id") or body.get("container", {}).get("channel_id") or ""),
        user=str(user.get("id", "")),
        team=str(user.get("team_id") or (body.get("team") or {}).get("id") or ""),
        name=str(user.get("name") or user.get("username") or ""),
        thread=message.get("thread_ts"),
        response_url=body.get("response_url"),
    )


def mention_text(text: str) -> str:
    """A mention's text without the @-mentions, as typed."""
    return unescape(_MENTION.sub("", text)).strip()


def unescape(text: str) -> str:
    """What the user typed: Slack's `&lt;` `&gt;` `&amp;` undone (`parse_prompt` reads a phone's `—ar` as `--ar`)."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def image_file(files: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first file that looks like an image."""
    for file in files:
        kind = str(file.get("mimetype") or "")
        name = str(file.get("name") or "").lower()
        if kind.startswith("image/") or name.endswith(tuple(f".{ext}" for ext in IMAGE_FILETYPES)):
            return file
    return None


def file_ref(file: dict[str, Any]) -> dict[str, Any]:
    """The parts of a file object worth keeping in a modal's private_metadata (at most 3,000 characters)."""
    keys = ("id", "name", "mimetype", "size", "url_private_download", "url_private")
    return {key: file[key] for key in keys if key in file}


def modal_values(view: dict[str, Any]) -> dict[str, Any]:
    """A submitted modal's inputs by block id: text for text and number inputs, a file list for file inputs."""
    values: dict[str, Any] = {}
    for block_id, actions in (view.get("state") or {}).get("values", {}).items():
        for state in actions.values():
            if state.get("type") == "file_input":
                values[block_id] = state.get("files") or []
            else:
                values[block_id] = state.get("value")
    return values


def submitted_file(values: dict[str, Any]) -> dict[str, Any] | None:
    """The file chosen in a modal's file input, if any."""
    files = values.get("image")
    return files[0] if isinstance(files, list) and files else None
