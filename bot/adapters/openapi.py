"""The OpenAPI 3.1 document of the HTTP API (tests/bot/test_web.py keeps it in step with the routes and answers)."""

from __future__ import annotations

from typing import Any

_ERROR = {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_JOB = {
    "description": "The job",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobEnvelope"}}},
}
_SSE = {
    "description": "Server-Sent Events: an `update` event (JSON `Update`) per change, `: keep-alive` comments",
    "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/Update"}}},
}
_JOB_SSE = {
    "description": "Server-Sent Events: first, at once, an `update` event with where the job stands (`queued` with "
    "its position and ETA, `started`, or its final kind), then one per change until the final one; `: keep-alive` "
    "comments",
    "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/Update"}}},
}
_UPDATE_KINDS = ["queued", "position", "started", "progress", "done", "failed", "cancelled", "deleted"]
_JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
_COMMON = {
    "400": _ERROR,
    "401": {**_ERROR, "description": "Missing or wrong API key (servers with keys)"},
    "421": {**_ERROR, "description": "Without keys: the Host is not localhost, a loopback address or [web] host"},
}
_WRITE = {"403": {**_ERROR, "description": "Not the job's owner, or (without keys) a cross-site request"}}
_LIMITED = {
    "429": {
        **_ERROR,
        "description": "A per-user, queue-wide or hourly limit; the same request works later (`Retry-After`: "
        "estimated seconds, where there is an estimate)",
    }
}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": {**responses, **_COMMON}, **extra}


def _nullable(kind: str) -> dict[str, Any]:
    return {"type": [kind, "null"]}


def document(title: str) -> dict[str, Any]:
    """The API description served at /api/v1/openapi.json."""
    job_fields: dict[str, Any] = {
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
        "strength": {"type": "number", "description": "img2img and inpaint"},
        "noise_level": {"type": "integer", "description": "upscale"},
    }
    new_job = {
        "command": {
            "type": "string",
            "description": "`/imagine a fox --ar 16:9`, `/edit ...`, `/upscale`; no other fields but `compare` with it",
        },
        **job_fields,
        "compare": {"type": "boolean", "description": "upscale: also return a plain bicubic enlargement"},
    }
    image = {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "url": {"type": "string"},
            "seed": {"type": "integer"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "nsfw": _nullable("boolean"),
            "kind": {"type": "string", "enum": ["result", "bicubic"]},
        },
    }
    job = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "state": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
            **job_fields,
            "strength": {**_nullable("number"), "description": "img2img and inpaint; null for other tasks"},
            "noise_level": {**_nullable("integer"), "description": "upscale; null for other tasks"},
            "user": {"type": "string", "description": "display name"},
            "mine": {"type": "boolean", "description": "made by the asking session (or key)"},
            "created": {"type": "number", "description": "Unix time"},
            "started": _nullable("number"),
            "finished": _nullable("number"),
            "position": _nullable("integer"),
            "eta": _nullable("number"),
            "reason": _nullable("string"),
            "message": {"type": "string"},
            "images": {"type": "array", "items": image},
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": f"{title} API", "version": "1"},
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "query": {"type": "apiKey", "in": "query", "name": "key", "description": "for EventSource and <img>"},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "JobEnvelope": {"type": "object", "properties": {"job": {"$ref": "#/components/schemas/Job"}}},
                "Job": job,
                "Update": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string", "enum": _UPDATE_KINDS},
                        "job": {"$ref": "#/components/schemas/Job"},
                        "position": _nullable("integer"),
                        "eta": _nullable("number"),
                        "step": {"type": "integer"},
                        "total": {"type": "integer"},
                        "preview": {"type": "string", "description": "data:image/png;base64,..."},
                    },
                },
                "NewJob": {
                    "type": "object",
                    "description": 'Values have the types given (`"width": "512"` is a 400); the image and '
                    "mask travel as base64 text in `image_base64` and `mask_base64` (`image` and `mask` are the "
                    "multipart names, refused in JSON)",
                    "properties": {
                        **new_job,
                        "image_base64": {"type": "string", "contentEncoding": "base64"},
                        "mask_base64": {"type": "string", "contentEncoding": "base64"},
                    },
                },
                "NewJobForm": {
                    "type": "object",
                    "description": "Every field is text; numbers and flags are read from it (`steps=20`, `compare=1`)",
                    "properties": {
                        **new_job,
                        "image": {"type": "string", "contentMediaType": "application/octet-stream"},
                        "mask": {"type": "string", "contentMediaType": "application/octet-stream"},
                    },
                },
                "Action": {
                    "type": "object",
                    "required": ["action"],
                    "properties": {
                        "action": {"type": "string", "enum": ["upscale", "variation", "reroll"]},
                        "index": {"type": "integer", "minimum": 1, "default": 1},
                    },
                },
                "Queue": {
                    "type": "object",
                    "properties": {
                        "queued": {"type": "integer", "description": "every platform"},
                        "running": {"type": "integer", "description": "every platform"},
                        "images_per_minute": {"type": "number"},
                        "engine_ready": {"type": "boolean"},
                        "jobs": {
                            "type": "array",
                            "description": "the waiting web jobs, with their place in the whole queue",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "string"},
                                    "position": {"type": "integer"},
                                    "task": {"type": "string"},
                                    "user": {"type": "string"},
                                },
                            },
                        },
                    },
                },
            },
        },
        "security": [{"bearer": []}, {"query": []}],
        "paths": {
            "/api/v1/jobs": {
                "post": _op(
                    "Submit a job (JSON, or multipart with `image` and `mask` files)",
                    {"202": _JOB, **_WRITE, "413": _ERROR, **_LIMITED},
                    requestBody={
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/NewJob"}},
                            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/NewJobForm"}},
                        }
                    },
                ),
                "get": _op(
                    "Recent jobs of the playground channel, oldest first",
                    {
                        "200": {
                            "description": "Jobs",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {
                                            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}
                                        },
                                    }
                                }
                            },
                        }
                    },
                    parameters=[
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                            "description": "how many of the newest jobs; default [web] history; outside 1-200: 400",
                        }
                    ],
                ),
            },
            "/api/v1/jobs/{job_id}": {
                "get": _op("A web job", {"200": _JOB, "404": _ERROR}, parameters=[_JOB_ID]),
                "delete": _op(
                    "Cancel an unfinished job, or delete a finished job's images (its owner only); a finished job "
                    "without images (cancelled, failed, deleted already) is answered as it stands",
                    {"200": _JOB, **_WRITE, "404": _ERROR},
                    parameters=[_JOB_ID],
                ),
            },
            "/api/v1/jobs/{job_id}/actions": {
                "post": _op(
                    "Press a result button: upscale or variation of image `index`, or reroll",
                    {
                        "202": _JOB,
                        **_WRITE,
                        "404": _ERROR,
                        **_LIMITED,
                        "410": {**_ERROR, "description": "The images were deleted"},
                    },
                    parameters=[_JOB_ID],
                    requestBody={"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Action"}}}},
                ),
            },
            "/api/v1/jobs/{job_id}/events": {
                "get": _op(
                    "Where one job stands, then its updates until its last",
                    {"200": _JOB_SSE, "404": _ERROR},
                    parameters=[_JOB_ID],
                ),
            },
            "/api/v1/events": {"get": _op("Updates of every playground job", {"200": _SSE})},
            "/api/v1/images/{digest}.png": {
                "get": _op(
                    "A result image (`Cache-Control: private, no-cache` with an ETag: deleted images stop showing)",
                    {
                        "200": {"description": "PNG", "content": {"image/png": {}}},
                        "304": {"description": "Not modified"},
                        "404": _ERROR,
                    },
                    parameters=[{"name": "digest", "in": "path", "required": True, "schema": {"type": "string"}}],
                ),
            },
            "/api/v1/queue": {
                "get": _op(
                    "Queue length and running jobs of every platform; the web's own waiting jobs",
                    {
                        "200": {
                            "description": "Queue",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Queue"}}},
                        }
                    },
                )
            },
            "/api/v1/openapi.json": {
                "get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI"}}}
            },
        },
    }
