"""What every answer carries at the HTTP level: security headers, HEAD wherever GET works, and
CORS only when SGZ_CORS_ORIGINS names the browser origins allowed to call.

The API's answers get a Content-Security-Policy that allows nothing (they are images and JSON,
never pages). The HTML pages (/docs) get one that lets Swagger UI run: its scripts and styles
from this service only, and its one inline script by hash, computed from the page itself so
that a fastapi-offline upgrade that changes the script cannot silently break the page.
"""

import base64
import hashlib
import re

from fastapi import FastAPI
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response
from .settings import Settings

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # older browsers; CSP frame-ancestors for the rest
    "Referrer-Policy": "no-referrer",
}
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
# Swagger UI: scripts, styles, the spec and "Try it out" calls from here; inline styles (its
# React components set some); data: images (its icons, in swagger-ui.css); blob: media (the
# page at / plays a video result it fetched with the API key, which <video src> cannot send)
PAGE_CSP = (
    "default-src 'self'; script-src {scripts}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; media-src 'self' blob:; object-src 'none'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
INLINE_SCRIPT = re.compile(
    rb"<script(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script\s*>", re.IGNORECASE | re.DOTALL
)
MAX_PAGE_BYTES = 1 << 20  # pages are buffered to hash their scripts; ours are ~1 kB
CORS_METHODS = ("GET", "HEAD", "POST", "DELETE")
CORS_REQUEST_HEADERS = ("Authorization", "X-API-Key", "X-Request-ID", "Content-Type", "Range")
CORS_EXPOSED = (
    "X-Request-ID",
    "X-Factor-ID",
    "Server-Timing",
    "Retry-After",
    "Content-Disposition",
    "Location",
    "Content-Range",
    "Accept-Ranges",
)


def page_csp(html: bytes) -> str:
    """The pages' policy, allowing exactly the inline scripts this page holds."""
    hashes = [
        f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'"
        for s in INLINE_SCRIPT.findall(html)
    ]
    return PAGE_CSP.format(scripts=" ".join(["'self'", *hashes]))


class SecurityMiddleware:
    """Pure ASGI, outermost: every answer, 401s and CORS refusals included, gets HEADERS and a
    policy. HEAD runs the GET route and sends no body (FastAPI routes answer only the methods
    they name, so HEAD /healthz was a 405)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = scope["method"] == "HEAD"
        if head:  # a copy: the server's own scope still says HEAD, so it frames the answer so
            scope = dict(scope, method="GET")
        start: Message | None = None
        page: list[bytes] | None = None

        async def secured(message: Message) -> None:
            nonlocal start, page
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.update(HEADERS)
                if headers.get("content-type", "").startswith("text/html"):
                    start, page = message, []  # held until the page is whole: its CSP hashes it
                    return
                headers.setdefault("Content-Security-Policy", API_CSP)
            elif message["type"] == "http.response.body" and page is not None:
                page.append(message.get("body", b""))
                if message.get("more_body", False) and sum(map(len, page)) <= MAX_PAGE_BYTES:
                    return
                html = b"".join(page)
                assert start is not None  # held together with page
                MutableHeaders(scope=start).setdefault("Content-Security-Policy", page_csp(html))
                await send(start)
                page = None
                message = {**message, "body": html}
            if head and message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {**message, "body": b""}
            await send(message)

        await self.app(scope, receive, secured)


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in our JSON error body."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code == 200:
            return response
        cors = {
            k: v
            for k, v in response.headers.items()
            if k.startswith("access-control-") or k == "vary"
        }
        return error_response(
            400,
            "cors_refused",
            f"{bytes(response.body).decode()}: this service "
            "allows the origins in SGZ_CORS_ORIGINS, the methods "
            f"{', '.join(CORS_METHODS)} and the headers "
            f"{', '.join(CORS_REQUEST_HEADERS)}",
            cors,
        )


def install(app: FastAPI, settings: Settings) -> None:
    """Add the middleware, outside what is already there: CORS answers preflights before the
    API key is asked for (browsers never send it on them)."""
    if settings.cors_origin_list:
        app.add_middleware(
            JsonCORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED,
        )
    app.add_middleware(SecurityMiddleware)
