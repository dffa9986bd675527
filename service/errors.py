"""Every error is JSON `{"error": <code>, "detail": <what went wrong and what to do>}`.

Bad input is always 4xx; 5xx means the service itself is overloaded (503), too slow (504) or
broken (500).
"""

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .batching import BatcherClosed, BatchFailed, ClientDisconnected, DeadlineExceeded, QueueFull

Responses = dict[int | str, dict[str, Any]]  # FastAPI's `responses=`

CLIENT_CLOSED = 499  # nginx's code: nobody reads it, but metrics count it apart


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def error_response(
    status: int, error: str, detail: str, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _code(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def install(app: FastAPI, retry_after_s: int) -> None:
    retry = {"Retry-After": str(retry_after_s)}
    batching_errors = {
        QueueFull: (503, "overloaded", retry),
        BatcherClosed: (503, "shutting_down", retry),
        DeadlineExceeded: (504, "deadline_exceeded", None),
        ClientDisconnected: (CLIENT_CLOSED, "client_disconnected", None),
        BatchFailed: (500, "inference_failed", None),
    }

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(
            exc.status_code, _code(exc.status_code), str(exc.detail), getattr(exc, "headers", None)
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, exc: RequestValidationError):
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return error_response(422, "invalid_parameter", detail)

    for cls, (status, code, headers) in batching_errors.items():

        async def handler(
            request: Request, exc: Exception, status=status, code=code, headers=headers
        ):
            return error_response(status, code, str(exc), headers)

        app.add_exception_handler(cls, handler)
