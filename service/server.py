"""How `sgz serve` runs the app: uvicorn with our h11 protocol (service/protocol.py: deadlines,
connection cap, strict framing), the soft file-descriptor limit raised, and a drain on SIGTERM.

The drain, from the first SIGTERM:
  - every new request gets 503 `shutting_down` with `Connection: close` (/readyz included),
    and answers to requests already in flight carry `Connection: close`;
  - the listener stays open for shutdown_grace_s, and after that for as long as requests
    admitted before the signal are still running (up to shutdown_timeout_s in all), so
    clients and load balancers get an answer instead of a refused or reset connection;
  - then uvicorn's own shutdown: close the listener and idle connections, wait for what is
    left, and run the app's lifespan shutdown (queued images finish, jobs are cancelled).
Ctrl-C (SIGINT) or a second SIGTERM skips the grace period.
"""

import logging
import resource
import signal
import time
from typing import cast

import uvicorn
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import logs
from .errors import error_response
from .protocol import MAX_LINGERING, ConnectionState, GuardedH11Protocol, Limits
from .security import API_CSP, HEADERS
from .settings import Settings

log = logging.getLogger("sgz.service")

FD_RESERVE = 256  # descriptors kept for everything but connections: model, logs, jobs, threads
MAX_HEADER_BYTES = 16 * 1024  # h11's default; beyond, 431


class Drain:
    """Whether the service is draining, and the requests it admitted that still run."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.active = 0


class DrainGuard:
    """Outermost ASGI layer: refuses new requests while draining, counts the others."""

    def __init__(self, app: ASGIApp, drain: Drain, retry_after_s: int):
        self.app, self.drain, self.retry_after_s = app, drain, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.since is not None:
            # read the body first: closing on unread bytes resets the connection, answer and all
            while (await receive()).get("more_body"):
                pass
            response = error_response(
                503,
                "shutting_down",
                "the service is shutting down; send the request again (to another instance)",
                {
                    "Retry-After": str(self.retry_after_s),
                    "Connection": "close",
                    **HEADERS,
                    "Content-Security-Policy": API_CSP,
                },
            )
            return await response(scope, receive, send)

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.drain.since is not None:
                MutableHeaders(scope=message)["Connection"] = "close"
            await send(message)

        self.drain.active += 1
        try:
            await self.app(scope, receive, send_closing)
        finally:
            self.drain.active -= 1


class Server(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, limits: Limits, drain: Drain, grace_s: float, timeout_s: float
    ):
        super().__init__(config)
        self.server_state = ConnectionState(limits)
        self.drain, self.grace_s, self.timeout_s = drain, grace_s, timeout_s
        self.drain_logged = False

    def handle_exit(self, sig: int, frame) -> None:
        # a signal handler: only set flags here, on_tick acts on them
        if sig == signal.SIGTERM and self.drain.since is None and not self.should_exit:
            self._captured_signals.append(sig)  # uvicorn re-raises it once stopped
            self.drain.since = time.monotonic()
            return
        if self.drain.since is None:
            self.drain.since = time.monotonic()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.since is not None and not self.should_exit:
            elapsed = time.monotonic() - self.drain.since
            if not self.drain_logged:
                self.drain_logged = True
                log.info(
                    "draining: new requests get 503 for at least %g s; %d in flight",
                    self.grace_s,
                    self.drain.active,
                    extra={"event": "drain", "in_flight": self.drain.active},
                )
            if (elapsed >= self.grace_s and self.drain.active == 0) or elapsed >= self.timeout_s:
                # what is left of shutdown_timeout_s is uvicorn's wait for in-flight requests
                self.config.timeout_graceful_shutdown = max(1, round(self.timeout_s - elapsed))
                self.should_exit = True
        return await super().on_tick(counter)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, e)
    return soft


def connection_cap(wanted: int, fd_limit: int) -> int:
    """SGZ_MAX_CONNECTIONS, lowered if needed so that connections (and refused ones still
    lingering) never use up the descriptors: then accept() never fails."""
    room = fd_limit - FD_RESERVE - MAX_LINGERING
    return max(1, min(wanted, room if room > 0 else fd_limit // 4))


def limits(settings: Settings, fd_limit: int) -> Limits:
    cap = connection_cap(settings.max_connections, fd_limit)
    if cap < settings.max_connections:
        log.warning(
            "SGZ_MAX_CONNECTIONS lowered from %d to %d: the open-files limit is %d",
            settings.max_connections,
            cap,
            fd_limit,
        )
    return Limits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        write_timeout_s=settings.write_timeout_s,
        min_transfer_rate=settings.min_transfer_rate,
        max_connections=cap,
        max_header_bytes=MAX_HEADER_BYTES,
    )


def run(app: ASGIApp, settings: Settings) -> int:
    """Serve until stopped; returns the exit status (3: could not start, as uvicorn.run)."""
    drain = Drain()
    config = uvicorn.Config(
        DrainGuard(app, drain, settings.retry_after_s),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=GuardedH11Protocol,
        ws="none",
        # annotated int, but only ever a delay for loop.call_later: a float works
        timeout_keep_alive=cast(int, settings.keepalive_timeout_s),
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        server_header=False,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        **logs.uvicorn_options(settings.log_format),
    )
    server = Server(
        config,
        limits(settings, raise_fd_limit()),
        drain,
        grace_s=settings.shutdown_grace_s,
        timeout_s=settings.shutdown_timeout_s,
    )
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 3
