"""uvicorn's h11 protocol with what it leaves to a proxy: deadlines on slow and idle clients,
a cap on open connections, strict framing, and our JSON error body for the requests the app
never sees.

One connection, one request at a time:
  headers  must all arrive within header_timeout_s of the connection's opening (or of the
           first byte after a kept-alive answer): else 408, or a silent close if nothing came;
  body     may take body_timeout_s, plus one second per min_transfer_rate bytes received:
           else 408 (the app sees a disconnect);
  answer   the client must keep taking it: while bytes wait in our buffer, it must take at
           least min_transfer_rate bytes a second over each write_timeout_s; else the
           connection is aborted and the buffered answer freed;
  idle     between requests, uvicorn's keep-alive timeout.
Connections beyond the cap get 503 at once and are closed. Protocol errors (h11's, both
Content-Length and Transfer-Encoding, a NUL in the path) get 400/431/501 as JSON and a close.
Closing with unread request bytes makes the kernel send a reset, which can destroy the answer
before the client reads it, so these closes half-close and discard what comes, briefly.
"""

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from .security import API_CSP, HEADERS

log = logging.getLogger("sgz.service")
# the headers the app's answers carry (service/security.py), on ours too
SECURITY_HEADERS = [
    (name.lower().encode(), value.encode())
    for name, value in [*HEADERS.items(), ("Content-Security-Policy", API_CSP)]
]

LINGER_S = 2.0  # how long a refused or failed connection may still send before we close it
MAX_LINGERING = 64  # connections lingering at once; beyond, close at once (fds are the limit)
REFUSAL_LOG_S = 10.0  # at most one log line this often about refused connections


@dataclass
class Limits:
    header_timeout_s: float
    body_timeout_s: float
    write_timeout_s: float
    min_transfer_rate: float
    max_connections: int
    max_header_bytes: int


class ConnectionState(ServerState):
    """uvicorn's state shared by every connection, with our limits and counters."""

    def __init__(self, limits: Limits):
        super().__init__()
        self.limits = limits
        self.lingering = 0
        self.refused = 0  # since the last log line about them
        self.refusal_logged = float("-inf")

    def note_refusal(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self.refusal_logged >= REFUSAL_LOG_S:
            log.warning(
                "refused %d connection(s): %d open, the limit (SGZ_MAX_CONNECTIONS "
                "%d); the next refusals are logged in %g s at the earliest",
                self.refused,
                len(self.connections),
                self.limits.max_connections,
                REFUSAL_LOG_S,
            )
            self.refused, self.refusal_logged = 0, now


class StrictConnection(h11.Connection):
    """h11, plus the checks it leaves out, and a count of body bytes for the body deadline."""

    def __init__(self, max_header_bytes: int):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.requests = 0
        self.body_bytes = 0
        self.error: h11.RemoteProtocolError | None = None

    def next_event(self):
        try:
            event = super().next_event()
            if isinstance(event, h11.Request):
                self.requests += 1
                self.body_bytes = 0
                _check_request(event)
            elif isinstance(event, h11.Data):
                self.body_bytes += len(event.data)
            return event
        except h11.RemoteProtocolError as e:
            self.error = e
            raise


def _check_request(event: h11.Request) -> None:
    names = [name for name, _ in event.headers]
    if b"content-length" in names and b"transfer-encoding" in names:
        # RFC 9112 6.3: a proxy in front may frame it by the other header (request smuggling)
        raise h11.RemoteProtocolError(
            "both Content-Length and Transfer-Encoding: the body's "
            "length is ambiguous; send one of them"
        )
    path = event.target.partition(b"?")[0].lower()
    if b"%00" in path:
        raise h11.RemoteProtocolError("a NUL byte (%00) in the path")


def raw_error(
    status: int, error: str, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> bytes:
    """A whole JSON error answer that closes the connection, for when no app runs."""
    body = json.dumps({"error": error, "detail": detail}, separators=(",", ":")).encode()
    lines = [b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode())]
    lines += [name + b": " + value for name, value in [*headers, *SECURITY_HEADERS]]
    lines += [
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class GuardedH11Protocol(H11Protocol):
    # narrower than uvicorn's declarations: ours are always these subclasses
    server_state: ConnectionState
    conn: StrictConnection

    def __init__(self, config, server_state: ConnectionState, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.limits = server_state.limits
        self.conn = StrictConnection(self.limits.max_header_bytes)
        self.read_phase: str | None = None  # "headers" or "body": what read_timer watches
        self.read_timer: asyncio.TimerHandle | None = None
        self.write_timer: asyncio.TimerHandle | None = None
        self.linger_timer: asyncio.TimerHandle | None = None
        self.body_since = 0.0  # when the body's deadline started counting
        self.write_since, self.write_backlog = 0.0, 0  # when bytes started waiting, how many

    # -- connections: the cap, and lingering closes
    def connection_made(self, transport) -> None:
        if len(self.connections) >= self.limits.max_connections:
            self.transport = transport
            self.server_state.note_refusal()
            self.answer_and_close(
                raw_error(
                    503,
                    "overloaded",
                    "too many open connections; retry shortly",
                    [*self.server_state.default_headers, (b"retry-after", b"1")],
                )
            )
            return
        super().connection_made(transport)
        # any byte we cannot hand to the kernel at once pauses the app's writes, so no
        # answer piles up in our memory and write_timer watches every stalled client
        transport.set_write_buffer_limits(high=0)
        self.watch_reading()

    def connection_lost(self, exc) -> None:
        for timer in (self.read_timer, self.write_timer, self.linger_timer):
            if timer is not None:
                timer.cancel()
        if self.linger_timer is not None:
            self.server_state.lingering -= 1
        if self.flow is not None:  # refused connections never started uvicorn's part
            super().connection_lost(exc)

    def answer_and_close(self, answer: bytes) -> None:
        """Write the answer, then close without resetting: half-close and discard what the
        client still sends, until it closes or LINGER_S pass."""
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(answer)
        if self.flow is not None:
            self.flow.resume_reading()  # to discard what comes, not leave it unread
        if self.server_state.lingering < MAX_LINGERING and transport.can_write_eof():
            self.server_state.lingering += 1
            transport.write_eof()
            self.linger_timer = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self.linger_timer is not None or self.flow is None:
            return  # answered already: the rest is discarded
        super().data_received(data)
        self.watch_reading()

    def eof_received(self) -> None:  # None: the transport closes itself (asyncio.Protocol)
        if self.linger_timer is not None:
            self.transport.close()

    # -- protocol errors: our JSON instead of uvicorn's plain text
    def send_400_response(self, msg: str) -> None:
        error = self.conn.error
        status = error.error_status_hint if error else 400
        # h11 appends the offending bytes as a bytearray repr: not worth echoing back
        detail = str(error).split(": bytearray(")[0] if error and str(error) else msg
        code = {431: "headers_too_large", 501: "not_implemented"}.get(status, "bad_request")
        if status == 431:
            detail = f"the request's headers exceed {self.limits.max_header_bytes} bytes"
        self.fail(status, code, f"invalid HTTP request: {detail}")

    def fail(self, status: int, error: str, detail: str) -> None:
        """Answer with an error if the app has not started answering, and close."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() sees a disconnect, sends do nothing
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self.answer_and_close(raw_error(status, error, detail, self.server_state.default_headers))

    # -- reading deadlines
    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.watch_reading()

    def watch_reading(self) -> None:
        state = self.conn.their_state
        if state is h11.IDLE and (self.conn.requests == 0 or self.conn.trailing_data[0]):
            phase = "headers"
        elif state is h11.SEND_BODY:
            phase = "body"
        else:
            phase = None  # read, or idle between requests (uvicorn's keep-alive timeout)
        if phase == self.read_phase or self.linger_timer is not None or self.transport.is_closing():
            return
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None
        self.read_phase = phase
        if phase == "headers":
            self.read_timer = self.loop.call_later(self.limits.header_timeout_s, self.headers_late)
        elif phase == "body":
            self.body_since = self.loop.time()
            self.read_timer = self.loop.call_later(self.limits.body_timeout_s, self.body_late)

    def headers_late(self) -> None:
        self.read_timer = None
        if self.conn.requests == 0 and not self.conn.trailing_data[0]:
            self.transport.close()  # nothing sent at all: nothing to answer
            return
        self.fail(
            408,
            "request_timeout",
            f"the request's headers took longer than "
            f"{self.limits.header_timeout_s:g} s (SGZ_HEADER_TIMEOUT_S)",
        )

    def body_late(self) -> None:
        self.read_timer = None
        now = self.loop.time()
        waiting_on_us = self.flow.read_paused or (
            self.cycle is not None and self.cycle.waiting_for_100_continue
        )
        if waiting_on_us:  # the app has not read yet (busy, or 100-continue not sent)
            self.body_since = now - self.conn.body_bytes / self.limits.min_transfer_rate
        deadline = (
            self.body_since
            + self.limits.body_timeout_s
            + self.conn.body_bytes / self.limits.min_transfer_rate
        )
        if now < deadline:
            self.read_timer = self.loop.call_later(deadline - now, self.body_late)
            return
        self.fail(
            408,
            "request_timeout",
            f"the request's body came too slowly: "
            f"{self.conn.body_bytes} bytes in {now - self.body_since:.0f} s "
            f"(SGZ_BODY_TIMEOUT_S, SGZ_MIN_TRANSFER_RATE)",
        )

    # -- writing deadline
    def pause_writing(self) -> None:
        if self.flow is None:  # a refused connection: its one short answer needs no watch
            return
        super().pause_writing()
        if self.write_timer is None:
            self.write_since = self.loop.time()
            self.write_backlog = self.transport.get_write_buffer_size()
            self.write_timer = self.loop.call_later(self.limits.write_timeout_s, self.write_late)

    def resume_writing(self) -> None:
        if self.flow is None:
            return
        super().resume_writing()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def write_late(self) -> None:
        """Checked every write_timeout_s while bytes wait: the client must have taken at least
        min_transfer_rate bytes a second over the interval. Interval by interval, not since the
        pause: the kernel's send buffer swallows up to megabytes at first (autotuning), which a
        client that never reads would otherwise bank as minutes of credit."""
        self.write_timer = None
        backlog = self.transport.get_write_buffer_size()
        now = self.loop.time()
        taken = max(0, self.write_backlog - backlog)
        if taken >= self.limits.min_transfer_rate * (now - self.write_since):
            self.write_since, self.write_backlog = now, backlog
            self.write_timer = self.loop.call_later(self.limits.write_timeout_s, self.write_late)
            return
        log.debug(
            "%s stopped reading its answer: connection aborted after %.0f s",
            "{}:{}".format(*self.client) if self.client else "a client",
            now - self.write_since,
        )
        self.transport.abort()
