"""Check REST bodies the bot sends against Discord's published OpenAPI document (tests/specs, MIT).

The document is OpenAPI 3.1, so its schemas are JSON Schema 2020-12; `$ref`s resolve inside it.
discord.py sends `attachments[].id` and `allowed_mentions.users`/`roles` as integers where the
document says snowflake strings, which Discord accepts; those ids are turned into strings before
checking.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parent / "specs" / "discord-openapi.json"


@functools.cache
def _spec() -> tuple[dict[str, Any], Registry[Any], list[tuple[re.Pattern[str], str]]]:
    document = json.loads(SPEC.read_text(encoding="utf-8"))
    registry: Registry[Any] = Registry().with_resource("spec.json", Resource(document, specification=DRAFT202012))
    routes = []
    for template in document["paths"]:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        routes.append((re.compile(f"^{pattern}$"), template))
    routes.sort(key=lambda route: route[1].count("{"))  # literal segments (`@original`) before parameters
    return document, registry, routes


def operation(method: str, path: str) -> str | None:
    """The OpenAPI path template for a request path, or None when the document lacks it."""
    _, _, routes = _spec()
    for pattern, template in routes:
        if pattern.match(path):
            return template
    return None


def check(method: str, path: str, body: Any) -> None:
    """Raise jsonschema.ValidationError unless `body` fits the documented JSON request body."""
    document, registry, _ = _spec()
    template = operation(method, path)
    assert template is not None, f"{method} {path} is not in Discord's OpenAPI document"
    op = document["paths"][template].get(method.lower())
    assert op is not None, f"{method} {template} is not in Discord's OpenAPI document"
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" not in content:
        assert body is None, f"{method} {template} takes no body"
        return
    schema = _rebase(content["application/json"]["schema"])
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    validator.validate(_stringify_attachment_ids(body))


def _rebase(schema: Any) -> Any:
    """Point the document-local `#/...` refs at the registered document."""
    if isinstance(schema, dict):
        return {k: ("spec.json" + v if k == "$ref" and v.startswith("#") else _rebase(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebase(item) for item in schema]
    return schema


def _stringify_attachment_ids(body: Any) -> Any:
    if isinstance(body, dict):
        out = {key: _stringify_attachment_ids(value) for key, value in body.items()}
        mentions = out.get("allowed_mentions")
        if isinstance(mentions, dict):
            for key in ("users", "roles"):
                if isinstance(mentions.get(key), list):
                    mentions[key] = [str(i) if isinstance(i, int) else i for i in mentions[key]]
        if isinstance(body.get("attachments"), list):
            out["attachments"] = [
                {**a, "id": str(a["id"])} if isinstance(a, dict) and isinstance(a.get("id"), int) else a
                for a in out["attachments"]
            ]
        return out
    if isinstance(body, list):
        return [_stringify_attachment_ids(item) for item in body]
    return body
