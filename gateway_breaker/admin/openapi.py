"""The admin API's OpenAPI 3.1 document, served at `{path}/openapi.json`.

Request schemas come from the same pydantic models the handlers validate with (the policy
fields from `Policy`, so a new policy field appears here by itself); responses follow the JSON
contract the dashboard reads.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from gateway_breaker.admin.app import MAX_MANUAL_SECONDS, ONE_LINE, PROBLEM
from gateway_breaker.policy import Policy

STATES = ["closed", "open", "half_open", "forced_open", "disabled", "metrics_only"]
MANUAL_MODES = ["forced_open", "disabled", "metrics_only"]
CAUSES = [
    "failure_threshold",
    "error_rate",
    "slow_calls",
    "timeout_elapsed",
    "probe_succeeded",
    "probe_failed",
    "manual",
    "manual_released",
    "manual_expired",
    "reset",
    "policy",
    "restored",
]

_TIME = {"type": ["number", "null"], "description": "Unix seconds; null when never"}
_COUNT = {"type": "integer", "minimum": 0}
_STATE = {"type": "string", "enum": STATES}
_STATUS_CODES = {
    "description": 'status codes, "500-599" ranges or "5xx" classes, alone or in a list',
    "anyOf": [
        {"type": "integer", "minimum": 100, "maximum": 599},
        {"type": "string", "minLength": 1, "maxLength": 200},
        {
            "type": "array",
            "minItems": 1,
            "maxItems": 500,
            "items": {
                "anyOf": [
                    {"type": "integer", "minimum": 100, "maximum": 599},
                    {"type": "string", "minLength": 1, "maxLength": 20},
                ]
            },
        },
    ],
}


def _strip(schema: Any) -> Any:
    """A pydantic schema without titles and defaults (noise for a PATCH body)."""
    if isinstance(schema, dict):
        return {k: _strip(v) for k, v in schema.items() if k not in ("title", "default")}
    if isinstance(schema, list):
        return [_strip(item) for item in schema]
    return schema


def _policy_patch() -> dict[str, Any]:
    properties = _strip(Policy.model_json_schema()["properties"])
    properties["failure_status_codes"] = _STATUS_CODES
    return {
        "type": "object",
        "description": "Any policy fields; the rest stay as they are",
        "properties": properties,
        "additionalProperties": False,
        "minProperties": 1,
    }


def _schemas() -> dict[str, Any]:
    ref = "#/components/schemas/"
    return {
        "Problem": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["field", "message"],
                        "properties": {
                            "field": {"type": "string"},
                            "message": {"type": "string"},
                        },
                    },
                },
            },
        },
        "ManualMode": {
            "type": "object",
            "required": ["mode", "until", "reason"],
            "properties": {
                "mode": {"type": "string", "enum": MANUAL_MODES},
                "until": _TIME,
                "reason": {"type": ["string", "null"]},
            },
        },
        "BreakerView": {
            "type": "object",
            "required": [
                "service",
                "state",
                "automatic_state",
                "failure_count",
                "success_count",
                "failure_rate",
                "window",
                "calls",
                "last_failure_time",
                "opened_at",
                "retry_after",
                "version",
                "manual",
                "policy",
                "policy_overridden",
                "local",
                "health",
                "rejection_probability",
            ],
            "properties": {
                "service": {"type": "string"},
                "state": _STATE,
                "automatic_state": {"type": "string", "enum": ["closed", "open", "half_open"]},
                "failure_count": _COUNT,
                "success_count": _COUNT,
                "failure_rate": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "window": {
                    "type": "object",
                    "required": ["calls", "failures"],
                    "properties": {"calls": _COUNT, "failures": _COUNT},
                },
                "calls": {
                    "type": "object",
                    "required": ["success", "failure", "slow", "rejected", "shed", "ignored"],
                    "additionalProperties": _COUNT,
                },
                "last_failure_time": _TIME,
                "opened_at": _TIME,
                "retry_after": {"type": "number", "minimum": 0},
                "version": _COUNT,
                "manual": {"anyOf": [{"$ref": ref + "ManualMode"}, {"type": "null"}]},
                "policy": {"type": "object"},
                "policy_overridden": {"type": "boolean"},
                "local": {"type": "boolean"},
                "health": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 1,
                    "description": "The window's success rate (the fleet's with Redis) over"
                    " success_rate_target, at most 1; 1 until min_calls calls are in it.",
                },
                "rejection_probability": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 1,
                    "description": "Share of calls the adaptive mode sheds now (computed, not"
                    " applied, under metrics_only; 0 in classic mode).",
                },
            },
        },
        "BreakerList": {
            "type": "object",
            "required": ["instance", "store", "store_up", "breakers"],
            "properties": {
                "instance": {"type": "string"},
                "store": {"type": "string", "enum": ["redis", "memory"]},
                "store_up": {"type": ["boolean", "null"]},
                "breakers": {"type": "array", "items": {"$ref": ref + "BreakerView"}},
            },
        },
        "TransitionEvent": {
            "type": "object",
            "required": ["service", "at", "from", "to", "cause", "origin", "instance", "version"],
            "properties": {
                "service": {"type": "string"},
                "at": {"type": "number"},
                "from": _STATE,
                "to": _STATE,
                "cause": {"type": "string", "enum": CAUSES},
                "origin": {"type": "string", "enum": ["local", "fleet", "manual"]},
                "instance": {"type": "string"},
                "version": _COUNT,
                "failure_count": _COUNT,
                "failure_rate": {"type": ["number", "null"]},
                "reason": {"type": ["string", "null"]},
                "id": {"type": "integer"},
            },
        },
        "History": {
            "type": "object",
            "required": ["service", "history"],
            "properties": {
                "service": {"type": "string"},
                "history": {"type": "array", "items": {"$ref": ref + "TransitionEvent"}},
            },
        },
        "StateVersion": {
            "type": "object",
            "required": ["state", "version"],
            "properties": {"state": _STATE, "version": _COUNT},
        },
        "Fleet": {
            "type": "object",
            "required": ["instances", "store"],
            "properties": {
                "instances": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "host", "pid", "started_at", "last_seen", "breakers"],
                        "properties": {
                            "id": {"type": "string"},
                            "host": {"type": "string"},
                            "pid": {"type": "integer"},
                            "started_at": {"type": "number"},
                            "last_seen": {"type": "number"},
                            "version": {"type": "string"},
                            "breakers": {
                                "type": "object",
                                "additionalProperties": {"$ref": ref + "StateVersion"},
                            },
                        },
                    },
                },
                "store": {
                    "type": "object",
                    "additionalProperties": {"$ref": ref + "StateVersion"},
                },
            },
        },
        "ManualRequest": {
            "type": "object",
            "required": ["mode"],
            "additionalProperties": False,
            "properties": {
                "mode": {"type": "string", "enum": MANUAL_MODES},
                "seconds": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": MAX_MANUAL_SECONDS,
                    "description": "the mode ends by itself after this many seconds",
                },
                "reason": {"type": "string", "maxLength": 200, "pattern": ONE_LINE},
            },
        },
        "PolicyPatch": _policy_patch(),
    }


def _json(schema: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _operation(
    summary: str,
    ok: str,
    *,
    service: bool = True,
    body: str | None = None,
    store: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {"description": "OK", **_json(ok)} if ok else {"description": "OK"},
        "401": _problem("no bearer token, or a wrong one"),
    }
    if service:
        responses["404"] = _problem("unknown service")
        # A gateway may refuse a malformed path (control characters, dot segments) itself.
        responses["400"] = _problem("the path is malformed")
    if body is not None:
        responses["400"] = _problem("the body is missing or not JSON, or the path is malformed")
        responses["413"] = _problem("the body is larger than 64 KB (a policy override: 8 KiB)")
        responses["415"] = _problem("the body is not application/json")
        responses["422"] = _problem("the body is invalid; `errors` names each field")
    if store:
        responses["503"] = _problem("Redis is unreachable: nothing was changed")
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if service:
        operation["parameters"] = [{"$ref": "#/components/parameters/service"}]
    if store and body != "ManualRequest":
        operation["parameters"].append({"$ref": "#/components/parameters/reason"})
        responses["422"] = _problem("the body or the reason is invalid; `errors` names each")
    if body is not None:
        operation["requestBody"] = {"required": True, **_json(body)}
    operation.update(extra or {})
    return operation


@cache
def _document(path: str) -> dict[str, Any]:
    history = _operation("Transitions, newest first", "History")
    history["parameters"].append(
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
        }
    )
    history["responses"]["422"] = _problem("limit is not an integer in 1..1000")
    events = _operation("Transitions as server-sent events", "", service=False)
    events["responses"]["200"] = {
        "description": "`id`, `event: transition` and `data` (a TransitionEvent with `breaker`)",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    events["parameters"] = [
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
        }
    ]
    events["responses"]["422"] = _problem("Last-Event-ID is not an event id")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gateway-breaker admin API",
            "version": "1",
            "description": "Fleet-wide circuit breakers: views, manual modes, reset, live policy.",
        },
        "servers": [{"url": path or "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/breakers": {"get": _operation("Every breaker", "BreakerList", service=False)},
            "/breakers/{service}": {"get": _operation("One breaker", "BreakerView")},
            "/breakers/{service}/manual": {
                "put": _operation(
                    "Set a manual mode, fleet-wide",
                    "BreakerView",
                    body="ManualRequest",
                    store=True,
                ),
                "delete": _operation("Lift the manual mode", "BreakerView", store=True),
            },
            "/breakers/{service}/reset": {
                "post": _operation("Closed, counters cleared", "BreakerView", store=True)
            },
            "/breakers/{service}/history": {"get": history},
            "/breakers/{service}/policy": {
                "patch": _operation(
                    "Change policy fields, fleet-wide",
                    "BreakerView",
                    body="PolicyPatch",
                    store=True,
                ),
                "delete": _operation("Back to the configured policy", "BreakerView", store=True),
            },
            "/fleet": {
                "get": _operation("Every live instance and its view", "Fleet", service=False),
            },
            "/events": {"get": events},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "parameters": {
                "reason": {
                    "name": "reason",
                    "in": "query",
                    "required": False,
                    "description": "why (kept in the history)",
                    "schema": {"type": "string", "maxLength": 200, "pattern": ONE_LINE},
                },
                "service": {
                    "name": "service",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
                },
            },
            "schemas": _schemas(),
        },
    }


def openapi_document(path: str) -> dict[str, Any]:
    """The document for the API served under `path` (a copy: callers may change it)."""
    return copy.deepcopy(_document(path))
