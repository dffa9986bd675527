"""Logs and traces (service/logs.py, service/tracing.py, docs/observability.md).

- The real `sgz serve` with SGZ_LOG_FORMAT=json and OTEL_EXPORTER_OTLP_ENDPOINT pointing at a
  small OTLP/HTTP receiver on a real socket: every output line is JSON, each request one line
  that matches its answer, start-up / drain / shutdown events, and the spans it exported.
- The app in-process (uvicorn in a thread, real socket) with an InMemorySpanExporter installed
  through tracing.install, the hook `sgz serve` uses: concurrent requests share a batch and
  the span tree and links are checked.
"""

import asyncio
import concurrent.futures
import gzip
import io
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image
from sgz_server import Server, photo

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

from bench.servers import free_port  # noqa: E402
from service import logs, tracing  # noqa: E402

API_KEY = "observability-test-key-0123456789"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
STAGES = {"queue", "inference", "decode", "encode"}


def small_png(size=(96, 64)) -> bytes:
    with Image.open(photo((512, 512))) as im:
        out = io.BytesIO()
        im.convert("RGB").resize(size).save(out, "PNG")
        return out.getvalue()


class Collector:
    """An OTLP/HTTP trace receiver: what `sgz serve`'s exporter POSTs to /v1/traces."""

    def __init__(self):
        self.spans = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":  # OTEL_..._COMPRESSION
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    attrs = {a.key: a.value.string_value for a in resource.resource.attributes}
                    for scope in resource.scope_spans:
                        collector.spans += [(attrs, s) for s in scope.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    return parsed


@pytest.fixture(scope="module")
def served():
    """The served JSON log after a fixed set of requests and a SIGTERM, the answers, and what
    the collector received."""
    collector = Collector()
    server = Server(
        {
            "SGZ_LOG_FORMAT": "json",
            "SGZ_API_KEY": API_KEY,
            "SGZ_MAX_UPLOAD_BYTES": "200000",
            "SGZ_SHUTDOWN_GRACE_S": "0",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_TRACES_EXPORTER": "",
            "OTEL_SERVICE_NAME": "sgz-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    key = {"X-API-Key": API_KEY}
    png = small_png()
    try:
        server.wait_ready()

        def post(body, **h):
            return httpx.post(
                f"{server.url}/enhance",
                content=body,
                timeout=60,
                headers={"Content-Type": "image/png", **key, **h},
            )

        answers = {
            "ok": post(png, traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01"),
            "own_id": post(png, **{"X-Request-ID": "client-chosen.id-7"}),
            "unsupported": post(b"this is not an image at all"),
            "too_large": post(b"\0" * 200001),
            "no_key": httpx.get(f"{server.url}/metrics"),
        }
        factor_id = answers["ok"].headers["X-Factor-ID"]
        answers["factor"] = httpx.get(f"{server.url}/factor/{factor_id}", headers=key)
        time.sleep(0.5)  # the exporter's 100 ms schedule
        server.terminate()
        yield json_lines(server.log()), answers, png, collector.spans
    finally:
        server.close()
        collector.close()


def request_line(lines: list[dict], response: httpx.Response) -> dict:
    mine = [
        line
        for line in lines
        if line.get("event") == "request" and line["request_id"] == response.headers["X-Request-ID"]
    ]
    assert len(mine) == 1, mine
    return mine[0]


def test_each_request_is_one_json_line_matching_its_answer(served):
    lines, answers, png, _ = served
    assert answers["ok"].status_code == 200
    line = request_line(lines, answers["ok"])
    assert line["logger"] == "sgz.access" and line["level"] == "info"
    assert (line["method"], line["route"], line["status"]) == ("POST", "/enhance", 200)
    assert line["request_bytes"] == len(png)
    assert line["response_bytes"] == len(answers["ok"].content)
    assert line["client"] == "127.0.0.1"
    timing = dict(
        part.split(";dur=") for part in answers["ok"].headers["Server-Timing"].split(", ")
    )
    assert line["timings_ms"] == {k: float(v) for k, v in timing.items()}
    assert set(line["timings_ms"]) == STAGES
    assert line["duration_ms"] + 0.5 >= sum(line["timings_ms"].values())  # both rounded
    assert line["trace_id"] == TRACE_ID  # the incoming traceparent's trace
    assert request_line(lines, answers["own_id"])["request_id"] == "client-chosen.id-7"


def test_errors_and_templates_in_request_lines(served):
    lines, answers, _, _ = served
    for name, status, route, error in [
        ("unsupported", 415, "/enhance", "unsupported_image"),
        ("too_large", 413, "/enhance", "payload_too_large"),
        ("no_key", 401, "/metrics", "unauthorized"),
        ("factor", 200, "/factor/{factor_id}", None),
    ]:
        assert answers[name].status_code == status, answers[name].text
        line = request_line(lines, answers[name])
        assert (line["status"], line["route"], line.get("error")) == (status, route, error)
        assert line["level"] == "info"  # 4xx: the client's mistake, not the service's
    assert request_line(lines, answers["too_large"])["request_bytes"] == 0  # refused unread
    assert request_line(lines, answers["unsupported"])["request_bytes"] == 27
    assert request_line(lines, answers["no_key"])["timings_ms"] == {}  # no stage ran


def test_lifecycle_events_and_no_secrets(served):
    lines, _, _, _ = served
    events = [line.get("event") for line in lines]
    for event in ("startup", "ready", "drain", "shutdown", "stopped"):
        assert event in events, events
    assert (
        events.index("startup")
        < events.index("ready")
        < events.index("drain")
        < events.index("shutdown")
        < events.index("stopped")
    )
    startup = lines[events.index("startup")]
    assert startup["settings"]["api_key"] == "set"
    assert startup["settings"]["log_format"] == "json"
    assert startup["model"]["backend"] and len(startup["model"]["sha256"]) == 64
    assert startup["tracing"] == ["otlp"]
    assert not any(API_KEY in json.dumps(line) for line in lines)
    # uvicorn's own lines come through the JSON formatter, its access log not at all
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    assert not any(line["logger"] == "uvicorn.access" for line in lines)


def test_spans_exported_over_otlp(served):
    lines, answers, _, spans = served
    ok = answers["ok"].headers["X-Request-ID"]
    server_spans = [s for _, s in spans if s.kind == s.SPAN_KIND_SERVER]
    mine = [
        s
        for s in server_spans
        if any(a.key == "sgz.request_id" and a.value.string_value == ok for a in s.attributes)
    ]
    assert len(mine) == 1, [s.name for _, s in spans]
    span = mine[0]
    assert span.name == "POST /enhance"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_ID
    children = {s.name for _, s in spans if s.parent_span_id == span.span_id}
    assert children == STAGES
    assert all(attrs["service.name"] == "sgz-test" for attrs, _ in spans)
    linked = [
        s
        for _, s in spans
        if s.name == "batch" and any(link.span_id == span.span_id for link in s.links)
    ]
    assert len(linked) == 1


@pytest.fixture
def memory_tracing():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


@pytest.fixture
def access_lines():
    """The request lines, formatted as in JSON mode, of an app in this process."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(self.format(record))

    handler = Keep()
    handler.setFormatter(logs.JsonFormatter())
    logs.access.addHandler(handler)
    logs.access.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logs.access.removeHandler(handler)


def serve_in_thread(app):
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return server, thread, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError("the in-process app never became ready")


def test_batch_span_links_every_request(published_enhancer, memory_tracing, access_lines):
    from service import Settings, create_app

    # batches wait 1 s for company (never dispatched early), so the 4 requests share one
    settings = Settings(
        log_format="json", max_wait_ms=1000, early_dispatch=False, warmup=False, io_threads=4
    )
    server, thread, url = serve_in_thread(create_app(settings, enhancer=published_enhancer))
    png = small_png()
    try:

        def post(i):
            headers = {"Content-Type": "image/png"}
            if i == 0:
                headers["traceparent"] = f"00-{TRACE_ID}-{PARENT_ID}-01"
            return httpx.post(url + "/enhance", content=png, headers=headers, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, range(4)))
    finally:
        server.should_exit = True
        thread.join(30)
    assert [a.status_code for a in answers] == [200] * 4
    spans = memory_tracing.get_finished_spans()
    requests = {
        s.attributes["sgz.request_id"]: s
        for s in spans
        if s.kind == SpanKind.SERVER and s.attributes["http.route"] == "/enhance"
    }
    assert len(requests) == 4
    assert not [s for s in spans if s.attributes.get("url.path") == "/readyz"]  # probes: none
    for answer in answers:
        span = requests[answer.headers["X-Request-ID"]]
        assert span.name == "POST /enhance"
        assert span.attributes["http.response.status_code"] == 200
        children = [
            s for s in spans if s.parent is not None and s.parent.span_id == span.context.span_id
        ]
        assert {s.name for s in children} == STAGES
        assert all(s.context.trace_id == span.context.trace_id for s in children)
    first = requests[answers[0].headers["X-Request-ID"]]
    assert format(first.context.trace_id, "032x") == TRACE_ID
    assert format(first.parent.span_id, "016x") == PARENT_ID and first.parent.is_remote
    batches = [s for s in spans if s.name == "batch"]
    linked = [link.context.span_id for b in batches for link in b.links]
    assert sorted(linked) == sorted(s.context.span_id for s in requests.values())
    assert max(b.attributes["sgz.batch.size"] for b in batches) >= 2  # a shared forward pass
    for b in batches:
        assert b.attributes["sgz.batch.size"] == len(b.links)
        assert b.attributes["sgz.batch.pixels"] == len(b.links) * 96 * 64
        assert b.attributes["sgz.backend"] == published_enhancer.backend
        assert b.parent is None  # a trace of its own, tied to the requests by links
    # the request's JSON line names the trace its spans are in
    by_id = {line["request_id"]: line for line in map(json.loads, access_lines)}
    for request_id, span in requests.items():
        assert by_id[request_id]["trace_id"] == format(span.context.trace_id, "032x")


def test_an_unhandled_exception_is_one_error_line_with_its_request_id(access_lines):
    from service.metrics import Metrics
    from service.middleware import ServiceMiddleware

    async def broken(scope, receive, send):
        raise RuntimeError("a bug")

    app = ServiceMiddleware(broken, Metrics(), routes=[], log_requests=True)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)

    async def get():
        async with httpx.AsyncClient(transport=transport, base_url="http://sgz") as client:
            return await client.get("/anything", headers={"X-Request-ID": "bug-1"})

    assert asyncio.run(get()).status_code == 500
    [line] = map(json.loads, access_lines)
    assert (line["level"], line["status"], line["request_id"]) == ("error", 500, "bug-1")
    assert (line["exc_type"], line["exc_message"]) == ("RuntimeError", "a bug")
    assert line["error"] == "internal_server_error" and "a bug" in line["traceback"]


def test_tracing_is_off_without_otel_variables(monkeypatch):
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    assert tracing.from_environment() is None
    tracing.install(tracing.from_environment())
    assert not tracing.enabled() and tracing.exporters() is None
    assert tracing.span("decode") is tracing.span("encode")  # the one shared no-op
    assert logs.observe({"type": "http"}, "id", log_requests=False) is None


@pytest.mark.parametrize(
    "environ, exporters",
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
    ],
)
def test_which_variables_switch_tracing_on(environ, exporters):
    assert tracing.wanted(environ) == exporters


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin is not supported"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf"),
    ],
)
def test_unsupported_tracing_setup_is_refused(environ, message):
    with pytest.raises(ValueError, match=message):
        tracing.from_environment(environ)
