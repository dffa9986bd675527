"""Reading an upload: an image (multipart field `image`, or a raw body with an image type)
into memory, or a video (field `video`, or a raw video body) streamed to a file.

The size limit is enforced while the body streams in (and from Content-Length before any of
it is read), so an oversized upload is answered with 413 after at most `max_bytes` bytes.
"""

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive

from .errors import ApiError

IMAGE_FIELD = "image"
RAW_TYPES = ("image/", "application/octet-stream")
VIDEO_FIELD = "video"
VIDEO_TYPES = ("video/", "application/octet-stream")
WRITE_CHUNK = 1024 * 1024  # bytes gathered before each write, done off the event loop

# For the OpenAPI schema: the body is read by hand, so FastAPI cannot infer it.
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
VIDEO_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [VIDEO_FIELD],
                    "properties": {VIDEO_FIELD: {"type": "string", "format": "binary"}},
                }
            },
            "video/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def too_large(max_bytes: int, seen: str, setting: str = "SGZ_MAX_UPLOAD_BYTES") -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the upload is {seen} bytes; this service accepts at most {max_bytes} "
        f"bytes per request ({setting})",
    )


async def read_image_bytes(request: Request, max_bytes: int) -> bytes:
    try:
        data = await _read(request, max_bytes)
        # uvicorn stops reading the socket once the body's last chunk passes its high-water
        # mark, and so would not notice the client leaving while the request is queued. A
        # receive() (which is what this does) resumes reading.
        await client_gone(request)
        return data
    except ClientDisconnect:
        raise ApiError(499, "client_disconnected", "the client went away mid-upload") from None


def _limited(request: Request, max_bytes: int, setting: str = "SGZ_MAX_UPLOAD_BYTES") -> Request:
    """The request with its body limited to max_bytes: 413 from Content-Length, before
    reading, or as soon as the bytes read cross it."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_request", f"Content-Length {length!r} is not a number")
        if int(length) > max_bytes:
            raise too_large(max_bytes, length, setting)
    return Request(request.scope, _counting(request.receive, max_bytes, setting))


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def save_video(
    request: Request, path: Path, max_bytes: int, check: Callable[[int], None]
) -> int:
    """Stream a video upload into `path`, never whole in memory; returns its size.
    `check(bytes so far)` runs as it grows and may raise (the disk budget)."""
    media = _media(request)
    limited = _limited(request, max_bytes, "SGZ_MAX_VIDEO_UPLOAD_BYTES")
    try:
        if media == "multipart/form-data":
            return await _video_from_multipart(limited, path, check)
        if media.startswith(VIDEO_TYPES):
            return await _stream_to(limited, path, check)
    except ClientDisconnect:
        raise ApiError(499, "client_disconnected", "the client went away mid-upload") from None
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {media or '(none)'!r} is not a video upload: send the video "
        f"as the raw body (-H 'Content-Type: video/mp4' --data-binary @clip.mp4) "
        f"or as multipart field {VIDEO_FIELD!r} (curl -F {VIDEO_FIELD}=@clip.mp4)",
    )


async def _stream_to(request: Request, path: Path, check: Callable[[int], None]) -> int:
    size = 0
    with open(path, "wb") as f:
        pending = bytearray()
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= WRITE_CHUNK:
                size += len(pending)
                check(size)
                await asyncio.to_thread(f.write, pending)
                pending = bytearray()
        size += len(pending)
        check(size)
        await asyncio.to_thread(f.write, pending)
    return size


async def _video_from_multipart(request: Request, path: Path, check: Callable[[int], None]) -> int:
    # Starlette spools the part to a temporary file beyond 1 MB: never all in memory
    async with _multipart_file(request, VIDEO_FIELD, "missing_video") as upload:
        check(upload.size or 0)
        await asyncio.to_thread(_copy, upload.file, path)
        return path.stat().st_size


@contextlib.asynccontextmanager
async def _multipart_file(
    request: Request, field: str, missing: str, in_memory: int = MultiPartParser.spool_max_size
):
    """The multipart body's file `field` (400 `missing` without it), the form closed after."""
    try:
        # Starlette spools a part over 1 MB to a temporary file; an image (already bounded by
        # max_bytes) stays in memory instead (docs/performance.md, "Image coding")
        parser = MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=16)
        parser.spool_max_size = in_memory
        form = await parser.parse()
    except MultiPartException as e:  # malformed multipart
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {e.message}") from None
    try:
        upload = form.get(field)
        if upload is None or isinstance(upload, str):
            raise ApiError(
                400,
                missing,
                f"multipart field {field!r} with a file is required "
                f"(fields sent: {sorted(form.keys()) or 'none'})",
            )
        yield upload
    finally:
        await form.close()


def _copy(source, path: Path) -> None:
    source.seek(0)
    with open(path, "wb") as f:
        shutil.copyfileobj(source, f, WRITE_CHUNK)


async def _read(request: Request, max_bytes: int) -> bytes:
    media = _media(request)
    limited = _limited(request, max_bytes)
    if media == "multipart/form-data":
        return await _from_multipart(limited, max_bytes)
    if media.startswith(RAW_TYPES):
        body = bytearray()
        async for chunk in limited.stream():
            body += chunk
        return bytes(body)
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {media or '(none)'!r} is not an image upload: send the image "
        f"as multipart field {IMAGE_FIELD!r} (curl -F {IMAGE_FIELD}=@photo.jpg) or "
        "as the raw body with its type (-H 'Content-Type: image/jpeg' "
        "--data-binary @photo.jpg)",
    )


async def client_gone(request: Request) -> bool:
    """`request.is_disconnected()` without its anyio cancel scope, which formats the task's
    repr on every call (docs/performance.md, "A cheaper disconnect check").

    Steps the ASGI receive() once, as that scope does: a message that is there already comes
    back at once; otherwise receive() suspends and is closed right there, as the cancelled
    one would be. After the body, the only message that can come is http.disconnect."""
    if request.scope.get("sgz.gone"):
        return True
    # ASGI servers' receive is an async def, so this is a coroutine (typed as an Awaitable)
    pending = cast(Coroutine[Any, Any, Message], request.receive())
    try:
        pending.send(None)
    except StopIteration as done:
        message = done.value
    else:
        pending.close()
        return False
    gone = message.get("type") == "http.disconnect"
    request.scope["sgz.gone"] = gone
    return gone


def _counting(receive: Receive, max_bytes: int, setting: str) -> Receive:
    seen = 0

    async def receive_counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise too_large(max_bytes, f"more than {max_bytes}", setting)
        return message

    return receive_counted


async def _from_multipart(request: Request, in_memory: int) -> bytes:
    async with _multipart_file(request, IMAGE_FIELD, "missing_image", in_memory) as upload:
        return await upload.read()
