"""One pure ASGI middleware for what every request shares: its id, the API key, the request
count / latency / in-flight metrics. Pure ASGI (not BaseHTTPMiddleware) so the body streams
through untouched and the disconnect check (uploads.client_gone) sees the real connection.
"""

import hmac
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import logs
from .errors import error_response
from .metrics import Metrics

REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class ServiceMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        routes: list[BaseRoute],
        api_key: str | None = None,
        log_requests: bool = False,
    ):
        self.app = app
        self.log_requests = log_requests  # one JSON line per request (service/logs.py)
        self.metrics = metrics
        self.routes = routes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id", "")
        if not REQUEST_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"], state["arrival"] = request_id, time.monotonic()
        state["authorized"] = self.api_key is None or self._authorized(headers, self.api_key)
        status = 500  # what the client sees if the app raises before responding
        error = None
        seen = logs.observe(scope, request_id, self.log_requests)  # None: no JSON log, no trace
        if seen is not None:
            receive = seen.receive(receive)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            if seen is not None:
                seen.sent(message)
            await send(message)

        self.metrics.in_flight.inc()
        try:
            if not state["authorized"] and scope["path"] not in OPEN_PATHS:
                response = error_response(
                    401,
                    "unauthorized",
                    "this service needs an API key: send it as "
                    "'X-API-Key: KEY' or 'Authorization: Bearer KEY'",
                    {"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except BaseException as e:
            error = e
            raise
        finally:
            self.metrics.in_flight.dec()
            endpoint = self._endpoint(scope)
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            if seen is not None:
                seen.finish(scope, endpoint, status, time.perf_counter() - start, error)

    def _authorized(self, headers: Headers, api_key: bytes) -> bool:
        key = headers.get("x-api-key")
        if key is None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        return key is not None and hmac.compare_digest(key.encode(), api_key)

    def _endpoint(self, scope: Scope) -> str:
        """The route's template ("/factor/{factor_id}"), so labels stay few."""
        for route in self.routes:
            if route.matches(scope)[0] == Match.FULL:
                return getattr(route, "path", "other")
        return "other"
