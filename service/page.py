"""The page for people at `/` (service/static/: plain HTML, CSS and JS, no build step, no CDN).

Served by a small ASGI layer that sits outside the API key check: the page and its files are
public (they hold nothing secret), the API calls the page makes carry the key, which the page
asks for when an answer is 401. It sits inside SecurityMiddleware, so the page gets the
security headers and its Content-Security-Policy (no inline script: its JS is /static/page.js).
Only GET and HEAD of `/` and `/static/...` are answered here; everything else goes on.
"""

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import FileResponse
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

STATIC = Path(__file__).with_name("static")
NO_CACHE = {"Cache-Control": "no-cache"}  # revalidate (ETag): a new version shows at once


async def index(request) -> FileResponse:
    return FileResponse(
        STATIC / "index.html", media_type="text/html; charset=utf-8", headers=NO_CACHE
    )


class PageMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app
        self.pages = Router(
            [
                Route("/", index, methods=["GET", "HEAD"]),
                Mount("/static", StaticFiles(directory=STATIC), name="static"),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] == "http"
            and scope["method"] in ("GET", "HEAD")
            and (path == "/" or path.startswith("/static/"))
        ):
            return await self.pages(scope, receive, send)
        await self.app(scope, receive, send)


def install(app: FastAPI) -> None:
    """Add after ServiceMiddleware (so outside it: no key asked) and before security.install
    (so inside it: headers and CSP)."""
    app.add_middleware(PageMiddleware)
