"""The OpenAPI 3.1 document of the HTTP API (tests/bot/test_web.py keeps it in step with the routes)."""

from __future__ import annotations

from typing import Any

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JOB = {
    "description": "The job",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobEnvelope"}}},
}
_SSE = {"description": "Server-Sent Events, one `update` event per change", "content": {"text/event-stream": {}}}
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": {**responses, "400": _ERROR, "401": _ERROR}, **extra}


def document(title: str) -> dict[str, Any]:
    """The API description served at /api/v1/openapi.json."""
    job_fields = {
        "task": {"type": "string", "enum": ["txt2img", "img2img", "inpaint", "upscale"]},
        "prompt": {"type": "string"},
        "negative_prompt": {"type": "string"},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "steps": {"type": "integer"},
        "guidance": {"type": "number"},
        "seed": {"type": "integer"},
        "count": {"type": "integer", "minimum": 1, "maximum": 4},
        "model": {"type": "string"},
        "scheduler": {"type": "string"},
        "strength": {"type": "number"},
        "noise_level": {"type": "integer"},
        "compare": {"type": "boolean"},
    }
    command = {"command": {"type": "string", "description": "`/imagine a fox --ar 16:9`, `/edit ...`, `/upscale`"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"{title} API", "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "JobEnvelope": {"type": "object", "properties": {"job": {"$ref": "#/components/schemas/Job"}}},
                "Job": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
                        "position": {"type": ["integer", "null"]},
                        "eta": {"type": ["number", "null"]},
                        "message": {"type": "string"},
                        "images": {"type": "array", "items": {"type": "object"}},
                        **job_fields,
                    },
                },
                "NewJob": {"type": "object", "properties": {**command, **job_fields}},
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/jobs": {
                "post": _op(
                    "Submit a job (JSON, or multipart with `image` and `mask` files)",
                    {"202": _JOB, "413": _ERROR},
                    requestBody={
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/NewJob"}},
                            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/NewJob"}},
                        }
                    },
                ),
                "get": _op("Recent jobs of the playground channel", {"200": {"description": "Jobs"}}),
            },
            "/api/v1/jobs/{job_id}": {
                "get": _op("A job", {"200": _JOB, "404": _ERROR}, parameters=[_JOB_ID]),
                "delete": _op(
                    "Cancel an unfinished job, or delete a finished job's images",
                    {"200": _JOB, "403": _ERROR, "404": _ERROR},
                    parameters=[_JOB_ID],
                ),
            },
            "/api/v1/jobs/{job_id}/actions": {
                "post": _op(
                    "Press a result button: upscale or variation of image `index`, or reroll",
                    {"202": _JOB, "404": _ERROR},
                    parameters=[_JOB_ID],
                ),
            },
            "/api/v1/jobs/{job_id}/events": {
                "get": _op("Updates of one job until its last", {"200": _SSE, "404": _ERROR}, parameters=[_JOB_ID]),
            },
            "/api/v1/events": {"get": _op("Updates of every playground job", {"200": _SSE})},
            "/api/v1/images/{digest}.png": {
                "get": _op(
                    "A result image",
                    {"200": {"description": "PNG", "content": {"image/png": {}}}, "404": _ERROR},
                    parameters=[{"name": "digest", "in": "path", "required": True, "schema": {"type": "string"}}],
                ),
            },
            "/api/v1/queue": {
                "get": _op("Queue length, running jobs and who is waiting", {"200": {"description": "Queue"}})
            },
            "/api/v1/openapi.json": {
                "get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI"}}}
            },
        },
    }
