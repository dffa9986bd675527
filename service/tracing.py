"""OpenTelemetry tracing, on only when the standard OTEL_* variables ask for it.

On when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, or
OTEL_TRACES_EXPORTER names an exporter (otlp, console) other than `none`; always off with
OTEL_SDK_DISABLED=true. The SDK reads the rest itself (OTEL_SERVICE_NAME, default here
"sgz-serve"; OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_BSP_*, OTEL_EXPORTER_OTLP_*).

Spans: one SERVER span per request (not for probes and scrapes, UNTRACED), its parent from
an incoming W3C `traceparent`, with children `decode`, `queue`, `inference`, `encode`; one
`batch` span per forward pass (a new trace, in the inference thread) with a link to every
request span it computed.

Off (the default), every hook here is one check of a module global: no SDK import, no span
objects. Asked for without the SDK (the `otel` extra), `sgz serve` refuses to start.
"""

import contextlib
import os
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

EXPORTERS = {"otlp", "console"}
UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: noise in traces
_NULL = contextlib.nullcontext()
_tracer = None  # an opentelemetry Tracer while tracing is on, else None
_provider = None  # the TracerProvider installed with it
_exporters: list[str] = []


def wanted(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters the environment asks for (empty: tracing off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [
        n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()
    ]
    if names:
        return [] if names == ["none"] else [n for n in names if n != "none"]
    endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    return ["otlp"] if endpoint else []


def from_environment(environ: Mapping[str, str] = os.environ):
    """A TracerProvider exporting as the OTEL_* variables say, or None when they ask for no
    tracing. Raises ValueError (a sentence for the operator) when they ask for what cannot be
    done: an unknown exporter, a protocol other than http/protobuf, the SDK not installed."""
    names = wanted(environ)
    if not names:
        return None
    unknown = sorted(set(names) - EXPORTERS)
    if unknown:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER: {', '.join(unknown)} is not supported "
            f"(supported: {', '.join(sorted(EXPORTERS))}, none)"
        )
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if "otlp" in names and protocol != "http/protobuf":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: only http/protobuf is "
            "installed (point it at the collector's port 4318)"
        )
    try:
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )
    except ImportError:
        raise ValueError(
            "OTEL_* variables ask for tracing but the OpenTelemetry SDK is not "
            "installed: pip install 'sgz-serve[otel]'"
        ) from None
    # OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES' service.name, else ours
    detected = OTELResourceDetector().detect().attributes.get("service.name", "sgz-serve")
    provider = TracerProvider(resource=Resource.create({"service.name": detected}))
    for name in names:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def install(provider, exporters: Sequence[str] = ("custom",)) -> None:
    """Trace with this TracerProvider from now on; None: tracing off. The service's one hook
    (sgz serve passes from_environment(); tests pass one with an in-memory exporter)."""
    global _tracer, _provider, _exporters
    _provider, _exporters = provider, list(exporters) if provider is not None else []
    _tracer = provider.get_tracer("sgz-serve") if provider is not None else None


def enabled() -> bool:
    return _tracer is not None


def exporters() -> list[str] | None:
    """What spans go to (for the start-up event); None when tracing is off."""
    return _exporters if _tracer is not None else None


def shutdown() -> None:
    """Export what is buffered and stop (at the end of the service)."""
    if _provider is not None:
        _provider.shutdown()


def span(name: str, **attributes: Any):
    """A child span of the current one, as a context manager (a no-op one when off)."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(name, attributes=attributes or None)


def record(name: str, start_ns: int, seconds: float, **attributes: Any) -> None:
    """A child span whose times are known after the fact (the batcher measures them)."""
    if _tracer is not None:
        s = _tracer.start_span(name, start_time=start_ns, attributes=attributes or None)
        s.end(end_time=start_ns + int(seconds * 1e9))


def now_ns() -> int:
    return time.time_ns()  # the clock spans are stamped with


def current_context():
    """The current span's context (what a batch span links to), or None when off."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def trace_id() -> str | None:
    context = current_context()
    return format(context.trace_id, "032x") if context is not None else None


def traced_batches(run: Callable[[list], Sequence], backend: str, device: str):
    """`run` (the batcher's run_batch) with one `batch` span per call, linked to the request
    span of every payload that carries one (`payload.trace`)."""

    def run_traced(payloads: list) -> Sequence:
        if _tracer is None:
            return run(payloads)
        from opentelemetry import context
        from opentelemetry.trace import Link

        links = [Link(p.trace) for p in payloads if getattr(p, "trace", None) is not None]
        attributes = {
            "sgz.batch.size": len(payloads),
            "sgz.backend": backend,
            "sgz.device": device,
            "sgz.batch.pixels": sum(getattr(p, "pixels", 0) for p in payloads),
        }
        with _tracer.start_as_current_span(
            "batch", context=context.Context(), links=links, attributes=attributes
        ):
            return run(payloads)

    return run_traced


class ServerSpan:
    """The span of one HTTP request, current while the app handles it."""

    def __init__(self, tracer, scope: MutableMapping[str, Any]):
        from opentelemetry import context, propagate, trace
        from starlette.datastructures import Headers

        parent = propagate.extract(Headers(scope=scope))  # W3C traceparent, when sent
        client = scope.get("client")
        self.method = scope["method"]
        self.span = tracer.start_span(
            scope["method"],
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.request.method": scope["method"],
                "url.path": scope["path"],
                "client.address": client[0] if client else "",
            },
        )
        self._token = context.attach(trace.set_span_in_context(self.span, parent))

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def end(self, route: str, status: int, attributes: dict, error: BaseException | None):
        from opentelemetry import context
        from opentelemetry.trace import Status, StatusCode

        self.span.update_name(f"{self.method} {route}")
        self.span.set_attributes(
            {"http.route": route, "http.response.status_code": status, **attributes}
        )
        if error is not None:
            self.span.record_exception(error)
        if status >= 500:  # server spans: only 5xx is the server's error (semconv)
            self.span.set_status(Status(StatusCode.ERROR, type(error).__name__ if error else None))
        self.span.end()
        context.detach(self._token)


def server_span(scope: MutableMapping[str, Any]) -> ServerSpan | None:
    if _tracer is None or scope["path"] in UNTRACED:
        return None
    return ServerSpan(_tracer, scope)
