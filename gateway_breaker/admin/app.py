"""The admin API: a Starlette app over the manager's public surface (views, commands, events).

`admin_app(manager, token=..., path="/_breakers")` serves the JSON contract under `path`; the
middleware mounts it there when `admin.token` is set. Every API call needs the bearer token
(compared in constant time, never logged or echoed); the dashboard page, its static files and
the OpenAPI document are served without it, since they hold no state.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway_breaker.errors import ConfigError, StoreError, redact_secrets
from gateway_breaker.policy import MAX_OVERRIDE_BYTES as MAX_POLICY_BYTES
from gateway_breaker.policy import Policy

if TYPE_CHECKING:
    from gateway_breaker.manager import CircuitBreakerManager
    from gateway_breaker.views import BreakerView, TransitionEvent

T = TypeVar("T")

logger = logging.getLogger("gateway_breaker")

MAX_BODY_BYTES = 64 * 1024
KEEPALIVE_SECONDS = 15.0
MAX_SSE_BACKLOG = 1000
MAX_MANUAL_SECONDS = 30 * 86_400
PROBLEM = "application/problem+json"
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$")
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}
# Headers on every page and static file: no sniffing, no framing, no referrer leaks.
_PAGE_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
    # Scripts, styles and connections from the dashboard's own origin only, nothing inline.
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    ),
}
ONE_LINE = r"^[^\x00-\x1f\x7f]*$"  # JSON Schema and pydantic: `$` is the end of the text
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ManualRequest(BaseModel):
    """Body of `PUT {path}/breakers/{service}/manual`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["forced_open", "disabled", "metrics_only"]
    seconds: float | None = Field(None, gt=0, le=MAX_MANUAL_SECONDS, allow_inf_nan=False)
    reason: str | None = Field(None, max_length=200, pattern=ONE_LINE)


class _Problem(Exception):
    """An error answer: raised anywhere in a handler, turned into problem+json."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = dict(headers or {})


def problem(
    status: int,
    title: str,
    detail: str,
    *,
    errors: list[dict[str, str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """An RFC 9457 problem document."""
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    body["detail"] = detail
    if errors is not None:
        body["errors"] = errors
    all_headers = {"cache-control": "no-store", **(headers or {})}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=all_headers)


def _unprocessable(errors: list[dict[str, str]]) -> _Problem:
    first = errors[0]
    return _Problem(
        422, "Unprocessable Content", f"{first['field']}: {first['message']}", errors=errors
    )


def _validation_errors(exc: ValidationError, known: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """pydantic errors as [{"field", "message"}], never echoing the input."""
    errors = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = [str(part) for part in error["loc"]]
        message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        if not loc:
            # A model-level rule (say, max_timeout_seconds >= timeout_seconds): name the field
            # its message mentions.
            found = [(m.start(), name) for name in known if (m := _word(name).search(message))]
            loc = [min(found)[1] if found else "body"]
        errors.append({"field": ".".join(loc), "message": message})
    return errors or [{"field": "body", "message": "invalid"}]


def _word(name: str) -> re.Pattern[str]:
    return re.compile(rf"\b{re.escape(name)}\b")


def _json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _json_body(request: Request) -> Any:
    """The request's JSON body, with the size, media type and syntax checked."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise _Problem(415, "Unsupported Media Type", "the body must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
        raise _Problem(413, "Content Too Large", f"the body must be at most {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _Problem(
                    413, "Content Too Large", f"the body must be at most {MAX_BODY_BYTES} bytes"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise _Problem(400, "Bad Request", "the client left before sending the body") from None
    raw = b"".join(chunks)
    if not raw.strip():
        raise _Problem(400, "Bad Request", "a JSON body is needed")
    try:
        return json.loads(raw, parse_constant=_json_constant)
    except (ValueError, RecursionError):
        # RecursionError: a hostile body nested thousands deep.
        raise _Problem(400, "Bad Request", "the body is not valid JSON") from None


class AdminAPI:
    """The handlers, bound to one manager and token; `routes()` lists them under `path`."""

    def __init__(
        self, manager: CircuitBreakerManager, token: str, path: str, static: Traversable
    ) -> None:
        self.manager = manager
        self.path = path
        self.static_root = static
        self._token_digest = hashlib.sha256(token.encode()).digest()

    # -- plumbing --------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Digests of equal length: the comparison time says nothing about the token's length.
        given = hashlib.sha256(credentials.strip().encode()).digest()
        return hmac.compare_digest(given, self._token_digest)

    def api(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """`handler` behind the bearer check, its errors turned into problem+json."""

        async def endpoint(request: Request) -> Response:
            if not self.authorized(request):
                given = "authorization" in request.headers
                challenge = 'Bearer realm="gateway-breaker"'
                if given:
                    challenge += ', error="invalid_token"'
                detail = "the bearer token is not valid" if given else "a bearer token is needed"
                return problem(401, "Unauthorized", detail, headers={"www-authenticate": challenge})
            try:
                return await handler(request)
            except _Problem as exc:
                return problem(
                    exc.status, exc.title, exc.detail, errors=exc.errors, headers=exc.headers
                )

        return endpoint

    def _service(self, request: Request) -> str:
        service = str(request.path_params["service"])
        if service not in self.manager.services():
            raise _Problem(404, "Not Found", f"unknown service {service!r}"[:200])
        return service

    def _view(self, service: str) -> dict[str, Any]:
        try:
            return self.manager.view(service).to_dict()
        except KeyError:
            raise _Problem(404, "Not Found", f"unknown service {service!r}") from None

    async def _store_call(self, service: str | None, action: Awaitable[T]) -> T:
        """`action`, with an unknown service as 404, a refused change as 422 and Redis
        unreachable as 503 saying what became of the change."""
        try:
            return await action
        except KeyError:
            raise _Problem(404, "Not Found", f"unknown service {service!r}") from None
        except ConfigError as exc:
            raise _unprocessable(_config_errors(exc)) from None
        except StoreError as exc:
            detail = redact_secrets(str(exc)) or "Redis is unreachable"
            logger.warning("Admin API: %s (service=%s)", detail, service)
            raise _Problem(
                503, "Service Unavailable", detail, headers={"retry-after": "1"}
            ) from None

    async def _command(self, service: str, action: Awaitable[BreakerView]) -> JSONResponse:
        view = await self._store_call(service, action)
        return JSONResponse(view.to_dict(), headers={"cache-control": "no-store"})

    # -- endpoints -------------------------------------------------------------------------

    async def list_breakers(self, request: Request) -> Response:
        manager = self.manager
        body = {
            "instance": manager.instance_id,
            "store": manager.store_kind,
            "store_up": manager.store_up,
            "breakers": [view.to_dict() for view in manager.views()],
        }
        return JSONResponse(body, headers={"cache-control": "no-store"})

    async def get_breaker(self, request: Request) -> Response:
        view = self._view(self._service(request))
        return JSONResponse(view, headers={"cache-control": "no-store"})

    async def set_manual(self, request: Request) -> Response:
        service = self._service(request)
        data = await _json_body(request)
        try:
            body = ManualRequest.model_validate(data)
        except ValidationError as exc:
            raise _unprocessable(_validation_errors(exc)) from None
        return await self._command(
            service,
            self.manager.set_manual(service, body.mode, seconds=body.seconds, reason=body.reason),
        )

    async def clear_manual(self, request: Request) -> Response:
        service = self._service(request)
        reason = _reason(request)
        return await self._command(service, self.manager.clear_manual(service, reason=reason))

    async def reset(self, request: Request) -> Response:
        service = self._service(request)
        reason = _reason(request)
        return await self._command(service, self.manager.reset(service, reason=reason))

    async def history(self, request: Request) -> Response:
        service = self._service(request)
        raw = request.query_params.get("limit", "50")
        if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= 1000):
            raise _unprocessable([{"field": "limit", "message": "an integer in 1..1000"}])
        events = await self._store_call(service, self.manager.history(service, limit=int(raw)))
        body = {"service": service, "history": [_event_json(event) for event in events]}
        return JSONResponse(body, headers={"cache-control": "no-store"})

    async def set_policy(self, request: Request) -> Response:
        service = self._service(request)
        data = await _json_body(request)
        if not isinstance(data, dict):
            raise _unprocessable([{"field": "body", "message": "must be an object of fields"}])
        if not data:
            raise _unprocessable([{"field": "body", "message": "at least one field is needed"}])
        if len(json.dumps(data, separators=(",", ":"))) > MAX_POLICY_BYTES:
            # Stored as one value every instance reads back: no larger than they accept.
            detail = f"a policy override must be at most {MAX_POLICY_BYTES} bytes of JSON"
            raise _Problem(413, "Content Too Large", detail)
        fields = tuple(Policy.model_fields)
        # The same model as the config, strictly typed (JSON has types; "5" is not 5), over the
        # policy in force, so the answer names every bad field before anything changes.
        policy = self.manager.view(service).policy.model_dump()
        current = {name: value for name, value in policy.items() if name in fields}
        try:
            Policy.model_validate({**current, **data}, strict=True)
        except ValidationError as exc:
            raise _unprocessable(_validation_errors(exc, fields)) from None
        reason = _reason(request)
        return await self._command(service, self.manager.set_policy(service, data, reason=reason))

    async def clear_policy(self, request: Request) -> Response:
        service = self._service(request)
        reason = _reason(request)
        return await self._command(service, self.manager.clear_policy(service, reason=reason))

    async def fleet(self, request: Request) -> Response:
        view = await self._store_call(None, self.manager.fleet())
        return JSONResponse(view.to_dict(), headers={"cache-control": "no-store"})

    async def events(self, request: Request) -> Response:
        raw = request.headers.get("last-event-id")
        after: int | None = None
        if raw is not None and raw.strip():
            if not (raw.strip().isascii() and raw.strip().isdigit()) or len(raw.strip()) > 18:
                raise _unprocessable([{"field": "Last-Event-ID", "message": "an event id"}])
            after = int(raw.strip())
        return EventStreamResponse(self.manager, after)

    # -- pages -----------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return _static(self.static_root, "index.html")

    async def index_redirect(self, request: Request) -> Response:
        return RedirectResponse(request.url.path + "/", status_code=308)

    async def static(self, request: Request) -> Response:
        return _static(self.static_root, str(request.path_params["file"]))

    async def openapi(self, request: Request) -> Response:
        from gateway_breaker.admin.openapi import openapi_document

        return JSONResponse(openapi_document(self.path), headers={"cache-control": "no-cache"})

    def routes(self) -> list[Route]:
        p = self.path
        api = self.api
        return [
            Route(f"{p}/breakers", api(self.list_breakers), methods=["GET"]),
            Route(f"{p}/breakers/{{service}}", api(self.get_breaker), methods=["GET"]),
            Route(f"{p}/breakers/{{service}}/manual", api(self.set_manual), methods=["PUT"]),
            Route(f"{p}/breakers/{{service}}/manual", api(self.clear_manual), methods=["DELETE"]),
            Route(f"{p}/breakers/{{service}}/reset", api(self.reset), methods=["POST"]),
            Route(f"{p}/breakers/{{service}}/history", api(self.history), methods=["GET"]),
            Route(f"{p}/breakers/{{service}}/policy", api(self.set_policy), methods=["PATCH"]),
            Route(f"{p}/breakers/{{service}}/policy", api(self.clear_policy), methods=["DELETE"]),
            Route(f"{p}/fleet", api(self.fleet), methods=["GET"]),
            Route(f"{p}/events", api(self.events), methods=["GET"]),
            Route(f"{p}/openapi.json", self.openapi, methods=["GET"]),
            Route(f"{p}/static/{{file}}", self.static, methods=["GET"]),
            Route(f"{p}/", self.index, methods=["GET"]),
            *([Route(p, self.index_redirect, methods=["GET"])] if p else []),
        ]


def _event_json(event: TransitionEvent) -> dict[str, Any]:
    return event.to_dict()


def _reason(request: Request) -> str | None:
    """The optional `?reason=` of a command without a body, for the history."""
    reason = request.query_params.get("reason")
    if reason is None or not reason.strip():
        return None
    if len(reason) > 200 or _CONTROL.search(reason):
        raise _unprocessable([{"field": "reason", "message": "at most 200 characters, one line"}])
    return reason


def _config_errors(exc: ConfigError) -> list[dict[str, str]]:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return [{"field": str(e.get("field")), "message": str(e.get("message"))} for e in errors]
    field, _, message = str(exc).partition(": ")
    return [{"field": field or "body", "message": message or str(exc)}]


def _static(root: Traversable, name: str) -> Response:
    if not _STATIC_NAME.match(name) or ".." in name:
        return problem(404, "Not Found", "no such file")
    suffix = name[name.rfind(".") :] if "." in name else ""
    content_type = _CONTENT_TYPES.get(suffix.lower())
    if content_type is None:
        return problem(404, "Not Found", "no such file")
    try:
        data = (root / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return problem(404, "Not Found", "no such file")
    return Response(data, media_type=content_type, headers=_PAGE_HEADERS)


class EventStreamResponse(Response):
    """`text/event-stream` of the manager's transitions, with keepalive comments.

    Ends when the client disconnects, when the manager's event stream ends (it closes), or when
    the server cancels the request; a client too slow to take 1000 queued events is cut off and
    reconnects with Last-Event-ID.
    """

    def __init__(
        self, manager: CircuitBreakerManager, after: int | None, keepalive: float | None = None
    ) -> None:
        self.manager = manager
        self.after = after
        self.keepalive = KEEPALIVE_SECONDS if keepalive is None else keepalive
        self.status_code = 200
        self.background = None
        self.init_headers(
            {
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-store",
                "x-accel-buffering": "no",
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        queue: asyncio.Queue[TransitionEvent] = asyncio.Queue()
        stop = asyncio.Event()

        async def pump() -> None:
            try:
                async for event in self.manager.events(after=self.after):
                    if queue.qsize() >= MAX_SSE_BACKLOG:
                        break
                    queue.put_nowait(event)
            except Exception:
                logger.exception("Admin event stream failed")
            finally:
                stop.set()

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            stop.set()

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(watch_disconnect())]
        await asyncio.sleep(0)  # the pump subscribes before the client hears "connected"
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": self.raw_headers,
                }
            )
            await self._send(send, b"retry: 2000\n: connected\n\n")
            while True:
                event = await self._next(queue, stop)
                if event is None:
                    break
                if event == "keepalive":
                    await self._send(send, b": keepalive\n\n")
                    continue
                await self._send(send, self._frame(event))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # ASGI 2.4: the client is gone
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _send(send: Send, data: bytes) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _next(
        self, queue: asyncio.Queue[TransitionEvent], stop: asyncio.Event
    ) -> TransitionEvent | Literal["keepalive"] | None:
        """The next event, "keepalive" after a quiet spell, or None when the stream ends."""
        if not queue.empty():
            return queue.get_nowait()
        if stop.is_set():
            return None
        getter = asyncio.ensure_future(queue.get())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {getter, stopper}, timeout=self.keepalive, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            getter.cancel()
            stopper.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        return None if stop.is_set() else "keepalive"

    def _frame(self, event: TransitionEvent) -> bytes:
        data = _event_json(event)
        try:
            data["breaker"] = self.manager.view(event.service).to_dict()
        except KeyError:
            data["breaker"] = None
        text = json.dumps(data, separators=(",", ":"), allow_nan=False)
        return f"id: {event.id}\nevent: transition\ndata: {text}\n\n".encode()


async def _not_found(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 405:
        return problem(405, "Method Not Allowed", f"{request.method} is not allowed here")
    if status == 404:
        return problem(404, "Not Found", "no such admin endpoint")
    return problem(status, "Error", "the request failed")


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.exception("Admin API request failed (path=%s)", request.url.path)
    return problem(500, "Internal Server Error", "the admin API failed; see the gateway's log")


class _NoSniff:
    """Pure ASGI: `X-Content-Type-Options: nosniff` on every admin answer (JSON, errors, pages),
    so no browser ever reads one as a script or a page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_nosniff(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != _NOSNIFF[0]]
                message = {**message, "headers": [*headers, _NOSNIFF]}
            await send(message)

        await self.app(scope, receive, send_nosniff)


_NOSNIFF = (b"x-content-type-options", b"nosniff")


def admin_app(
    manager: CircuitBreakerManager,
    *,
    token: str | SecretStr,
    path: str = "",
    static_dir: str | os.PathLike[str] | None = None,
) -> Starlette:
    """The admin API for `manager`, routes under `path` (e.g. "/_breakers"; "" to mount it).

    `token` is the bearer token every API call must send. The caller starts and closes the
    manager; the app only reads its views and sends its commands. `static_dir` serves the
    dashboard from another folder (default: the package's own `admin/static`).
    """
    secret = token.get_secret_value() if isinstance(token, SecretStr) else token
    if not isinstance(secret, str) or not secret.strip():
        raise ConfigError("admin.token: must not be empty")
    if path == "/":
        raise ConfigError("admin.path: '/' would take every request; use a path such as /_breakers")
    path = path.rstrip("/")
    if path and (not path.startswith("/") or any(c in path for c in "?#{} ")):
        raise ConfigError(f"admin.path: a path starting with '/': {path!r}")
    static: Traversable = resources.files("gateway_breaker.admin") / "static"
    if static_dir is not None:
        static = Path(static_dir)
    api = AdminAPI(manager, secret.strip(), path, static)
    app = Starlette(
        routes=api.routes(),
        exception_handlers={HTTPException: _not_found, Exception: _server_error},
        middleware=[Middleware(_NoSniff)],
    )
    app.state.admin = api
    return app
