"""Logs an operator can follow: SGZ_LOG_FORMAT=text (as uvicorn prints, the default) or json,
one JSON object per line on stderr: every log record, plus one `request` line per HTTP request
(written by ServiceMiddleware through `observe`).

In JSON mode uvicorn's access log is off: the `request` line says all it said (method, status,
client) and more, with the request id that ties it to the answer's X-Request-ID. uvicorn's
other records (start-up, errors) go through the same JSON formatter.
"""

import contextvars
import datetime
import json
import logging
import sys
import traceback

from pydantic import SecretStr
from starlette.types import Message, Receive, Scope

from . import tracing

access = logging.getLogger("sgz.access")
log = logging.getLogger("sgz.service")

# The request being handled, so that any record logged while handling it carries its id.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sgz_request_id", default=None
)
# What every LogRecord has; anything else on a record came from `extra=` and is logged.
STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
    "taskName",
}
TEXT_FORMAT = "%(levelname)s:     %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ts, level, logger, message, the request id and
    trace id when logged while handling a request, the record's `extra` fields, and for an
    exception its type, message and traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (request_id := REQUEST_ID.get()) is not None:
            line["request_id"] = request_id
            if (trace_id := tracing.trace_id()) is not None:
                line["trace_id"] = trace_id
        line.update((k, v) for k, v in vars(record).items() if k not in STANDARD)
        if record.exc_info and record.exc_info[0] is not None:
            kind, error, tb = record.exc_info
            line.update(
                exc_type=kind.__name__,
                exc_message=str(error),
                traceback="".join(traceback.format_exception(kind, error, tb)),
            )
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(log_format: str, level: str) -> None:
    """The root logger's one handler, on stderr, in this format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)


def uvicorn_options(log_format: str) -> dict:
    """uvicorn.Config arguments: in JSON mode it installs no handlers of its own (its records
    reach the root's JSON handler) and writes no access log (our request line replaces it)."""
    return {"log_config": None, "access_log": False} if log_format == "json" else {}


def startup(settings, enhancer) -> None:
    """The start-up event: every setting (secrets, such as the API key, only as set / unset)
    and the model."""
    summary = settings.model_dump(mode="json")
    for name, value in vars(settings).items():
        if isinstance(value, SecretStr):
            summary[name] = "set"
    model = {
        "checkpoint": str(enhancer.checkpoint.source),
        "sha256": enhancer.sha256,
        "backend": enhancer.backend,
        "device": str(enhancer.device),
    }
    log.info(
        "starting: checkpoint %s on %s (%s)",
        enhancer.sha256[:12],
        enhancer.device,
        enhancer.backend,
        extra={
            "event": "startup",
            "settings": summary,
            "model": model,
            "tracing": tracing.exporters(),
        },
    )


class Observation:
    """One request, seen from ServiceMiddleware: its bytes in and out, its Server-Timing, its
    span; `finish` writes its JSON line and ends the span."""

    def __init__(self, scope: Scope, request_id: str, log_requests: bool):
        self.log_requests, self.request_id = log_requests, request_id
        self.bytes_in = self.bytes_out = 0
        self.timing = b""
        self.status = 0
        self.error_code: str | None = None
        self.token = REQUEST_ID.set(request_id)
        self.span = tracing.server_span(scope)

    def receive(self, receive: Receive) -> Receive:
        async def counted() -> Message:
            message = await receive()
            self.bytes_in += len(message.get("body", b""))
            return message

        return counted

    def sent(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.timing = next(
                (v for k, v in message.get("headers", ()) if k.lower() == b"server-timing"), b""
            )
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if self.status >= 400 and self.bytes_out == 0:
                self.error_code = error_code(body)
            self.bytes_out += len(body)

    def finish(
        self, scope: Scope, route: str, status: int, seconds: float, error: BaseException | None
    ) -> None:
        try:
            if self.log_requests:
                self._log(scope, route, status, seconds, error)
            if self.span is not None:
                self.span.end(
                    route,
                    status,
                    {
                        "sgz.request_id": self.request_id,
                        "http.request.body.size": self.bytes_in,
                        "http.response.body.size": self.bytes_out,
                    },
                    error,
                )
        finally:
            REQUEST_ID.reset(self.token)

    def _log(
        self, scope: Scope, route: str, status: int, seconds: float, error: BaseException | None
    ) -> None:
        client = scope.get("client")
        fields = {
            "event": "request",
            "method": scope["method"],
            "route": route,
            "status": status,
            "request_bytes": self.bytes_in,
            "response_bytes": self.bytes_out,
            "duration_ms": round(seconds * 1000, 2),
            "timings_ms": stage_timings(self.timing),
            "client": client[0] if client else None,
        }
        if self.span is not None:
            fields["trace_id"] = self.span.trace_id
        if self.error_code is not None or error is not None:
            fields["error"] = self.error_code or "internal_server_error"
        level = (
            logging.ERROR
            if error is not None
            else (logging.WARNING if status >= 500 else logging.INFO)
        )
        access.log(level, "%s %s %d", scope["method"], route, status, extra=fields, exc_info=error)


def observe(scope: Scope, request_id: str, log_requests: bool) -> Observation | None:
    """An Observation when JSON logs or tracing want one; None (nothing to do) otherwise."""
    if log_requests or tracing.enabled():
        return Observation(scope, request_id, log_requests)
    return None


def error_code(body: bytes) -> str | None:
    """The `error` of an error answer's JSON body (service/errors.py), if it is one."""
    if not body.startswith(b"{") or len(body) > 4096:
        return None
    try:
        code = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    return code if isinstance(code, str) else None


def stage_timings(header: bytes) -> dict[str, float]:
    """`queue;dur=0.4, inference;dur=51.2` -> {"queue": 0.4, "inference": 51.2}."""
    out = {}
    for part in header.decode("latin-1").split(","):
        name, _, dur = part.strip().partition(";dur=")
        try:
            out[name] = float(dur)
        except ValueError:
            continue
    return out
