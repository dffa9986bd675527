"""The HTTP endpoints. Thin: read, decode, queue, encode; the work lives in Runtime."""

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from model.enhancer import DENOISE, MAX_DENOISE, parse_exposure
from model.gpu_jpeg import GpuJpeg
from model.imageio import MEDIA_TYPES, encode_image, output_format, tensor_to_rgb

from .errors import ApiError, Responses
from .factor_store import (
    FactorStoreUnavailable,
    StoredFactor,
    full_npy_length,
    full_npy_strip,
    npy_strips,
    render_factor,
)
from .inference import ENHANCE, FACTOR, Work
from .runtime import Runtime, Timing
from .uploads import IMAGE_BODY

router = APIRouter()

FactorFormat = Literal["png", "npy"]
FactorSize = Annotated[
    Literal["efe", "full"] | None,
    Query(
        description="efe: EFE's resolution (the image's size / the scale factor, 12); full: the "
        "image's size (4K as npy: 99.5 MB, streamed); default: efe for npy, full for png"
    ),
]
FACTOR_MEDIA = {"png": "image/png", "npy": "application/octet-stream"}
ERRORS: Responses = {
    code: {"description": text}
    for code, text in {
        400: "empty, corrupt or truncated image, malformed upload",
        401: "API key missing or wrong (only when SGZ_API_KEY is set)",
        413: "upload over SGZ_MAX_UPLOAD_BYTES, or image over SGZ_MAX_PIXELS",
        415: "not an image, or not a format this service reads",
        422: "a query parameter out of range",
        503: "queue full or not ready: retry after Retry-After seconds",
        504: "the request's deadline (SGZ_REQUEST_TIMEOUT_S) passed, queued or being computed",
    }.items()
}


# The options /enhance and /jobs share.
Strength = Annotated[
    float, Query(ge=0, le=1, description="scales the factor map: 1 = the model, 0 = unchanged")
]
Denoise = Annotated[
    float,
    Query(ge=0, le=MAX_DENOISE, description="noise removal: 0 = off, 1 = default, more = stronger"),
]
Exposure = Annotated[
    str,
    Query(
        max_length=16,
        description="auto: lift images darker than mean "
        "0.40 up to it; model: the model's own level; a number in "
        "[0.05, 0.95]: the mean brightness to reach",
    ),
]


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def authorized(request: Request) -> bool:
    """Whether the request carries the API key (always true when none is set)."""
    return getattr(request.state, "authorized", False)  # set by ServiceMiddleware


Authorized = Annotated[bool, Depends(authorized)]


def exposure_level(exposure: str) -> float | str | None:
    try:
        return parse_exposure(exposure)
    except ValueError as e:
        raise ApiError(422, "invalid_parameter", str(e)) from None


@router.post(
    "/enhance",
    response_class=Response,
    openapi_extra=IMAGE_BODY,
    responses={
        200: {
            "content": {m: {} for m in MEDIA_TYPES.values()},
            "description": "the enhanced image, same size",
        },
        **ERRORS,
    },
)
async def enhance(
    request: Request,
    strength: Strength = 1.0,
    format: Annotated[
        Literal["png", "jpeg", "webp"] | None,
        Query(description="output format; default: the input's (PNG for formats other than these)"),
    ] = None,
    quality: Annotated[int, Query(ge=1, le=100, description="JPEG/WebP quality")] = 90,
    denoise: Denoise = DENOISE,
    exposure: Exposure = "auto",
) -> Response:
    """Brighten a dark photo. The image comes as multipart field `image` or as the raw body.
    Its factor map stays available for a while at `GET /factor/{X-Factor-ID}`."""
    rt, timing = runtime(request), Timing()
    level = exposure_level(exposure)
    rt.check_ready()
    decoded, tensor = await rt.receive_image(request, timing)
    fmt = output_format(format, decoded.format)
    gpu = rt.gpu_jpeg if fmt == "JPEG" and not decoded.gray else None
    work = Work(tensor, strength, ENHANCE, denoise, level, on_device=gpu is not None)
    out = await rt.infer(request, work, timing)
    factor_id = await rt.factors.save(out.factor_lowres, tuple(tensor.shape[-2:]))
    body, device = await rt.encode(_encode, out.image, decoded, fmt, quality, gpu, timing=timing)
    rt.metrics.coded.labels("encode", device).inc()
    return Response(
        body,
        media_type=MEDIA_TYPES[fmt],
        headers={"Server-Timing": timing.header(), **_factor_header(factor_id)},
    )


def _encode(
    image, decoded, fmt: str, quality: int, gpu: GpuJpeg | None = None
) -> tuple[bytes, str]:
    """The answer's bytes, and the device that encoded them."""
    if gpu is not None and image.is_cuda:  # None back: the GPU failed, the CPU encodes
        body = gpu.encode(image, quality)
        if body is not None:
            return body, "gpu"
    return encode_image(tensor_to_rgb(image), decoded.alpha, decoded.gray, fmt, quality), "cpu"


def _factor_header(factor_id: str | None) -> dict[str, str]:
    return {"X-Factor-ID": factor_id} if factor_id else {}


@router.get(
    "/factor/{factor_id}",
    response_class=Response,
    responses={
        200: {
            "content": {m: {} for m in FACTOR_MEDIA.values()},
            "description": "PNG picture or float32 .npy (h, w, 3)",
        },
        404: {"description": "unknown or evicted factor id"},
        503: {"description": "the shared factor store (Redis) is unreachable"},
    },
)
async def get_factor(
    request: Request,
    factor_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]+$", max_length=128)],
    format: FactorFormat = "png",
    size: FactorSize = None,
) -> Response:
    """The factor map x_r of a recent `/enhance` or `/factor` request, by the `X-Factor-ID`
    that answer carried: a picture where darker means a lower factor (paper Fig. 3), or with
    `?format=npy` the float32 map in [-1, 1]."""
    rt = runtime(request)
    try:
        entry = await rt.factors.load(factor_id)
    except FactorStoreUnavailable:
        raise ApiError(
            503,
            "factor_store_unavailable",
            "the store of factor maps (Redis) cannot be reached; retry later",
            {"Retry-After": str(rt.settings.retry_after_s)},
        ) from None
    if entry is None:
        raise ApiError(
            404,
            "unknown_factor_id",
            "no factor map with this id: unknown, expired or evicted from the store "
            "of recent maps (SGZ_FACTOR_TTL_S, SGZ_FACTOR_STORE_ITEMS / _BYTES); "
            "the id is the X-Factor-ID header of the /enhance or /factor answer",
        )
    return await _factor_response(rt, entry, format, size, factor_id)


@router.post(
    "/factor",
    response_class=Response,
    openapi_extra=IMAGE_BODY,
    responses={200: {"content": {m: {} for m in FACTOR_MEDIA.values()}}, **ERRORS},
)
async def post_factor(
    request: Request, format: FactorFormat = "png", size: FactorSize = None
) -> Response:
    """Compute the factor map of an uploaded image (EFE only, no enhancement); it is also
    kept under the answer's `X-Factor-ID`."""
    rt, timing = runtime(request), Timing()
    rt.check_ready()
    _, tensor = await rt.receive_image(request, timing)
    out = await rt.infer(request, Work(tensor, 1.0, FACTOR), timing)
    h, w = tensor.shape[-2:]
    entry = StoredFactor(out.factor_lowres, (h, w))
    factor_id = await rt.factors.save(entry.lowres, entry.size)
    response = await _factor_response(rt, entry, format, size, factor_id, timing)
    response.headers["Server-Timing"] = timing.header()
    response.headers.update(_factor_header(factor_id))
    return response


async def _factor_response(
    rt: Runtime,
    entry: StoredFactor,
    fmt: str,
    size: str | None,
    factor_id: str | None,
    timing: Timing | None = None,
) -> Response:
    full = (size or ("efe" if fmt == "npy" else "full")) == "full"
    headers = {"Content-Disposition": f'inline; filename="factor-{factor_id or "map"}.{fmt}"'}
    if fmt == "npy" and full:  # ~100 MB at 4K: made strip by strip, as the client reads
        headers["Content-Length"] = str(full_npy_length(entry))

        async def strips():
            for y0, y1 in npy_strips(entry):
                yield await rt.run_in(rt.encode_pool, full_npy_strip, entry, y0, y1)

        return StreamingResponse(strips(), media_type=FACTOR_MEDIA[fmt], headers=headers)
    body = await rt.encode(render_factor, entry, fmt, full, timing=timing or Timing())
    return Response(body, media_type=FACTOR_MEDIA[fmt], headers=headers)


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers. Never needs the API key."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "loading, warming up or shutting down"}})
async def readyz(request: Request, with_key: Authorized):
    """Readiness: the model is loaded and warmed up. Never needs the API key; with a key set,
    the checkpoint's hash is shown only to requests that carry it."""
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is None or not rt.ready:
        return JSONResponse(
            {"error": "not_ready", "detail": "loading, warming up or shutting down"},
            status_code=503,
        )
    # a shared store that is down leaves the replica ready: it still enhances (docs/scaling.md)
    ready = {
        "status": "ready",
        "device": str(rt.enhancer.device),
        "jpeg_codec": "gpu" if rt.gpu_jpeg is not None else "cpu",
        "factor_store": await rt.factors.status(),
    }
    return {**ready, "checkpoint_sha256": rt.enhancer.sha256} if with_key else ready


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)
