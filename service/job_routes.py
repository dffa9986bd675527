"""The video job endpoints: submit, poll, download, cancel. The work lives in JobManager."""

import os
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from model.enhancer import DENOISE
from model.video import EncoderOptions

from .errors import ApiError, Responses
from .job_record import CANCELLED, DONE, FAILED, JobOptions
from .routes import Denoise, Exposure, Strength, exposure_level, runtime
from .shared_jobs import SharedJobs
from .uploads import VIDEO_BODY

router = APIRouter(tags=["video jobs"])


JOB = {"description": "the job: state, progress, input, options"}
UNKNOWN: Responses = {
    404: {"description": "unknown job, deleted, or expired"},
    503: {"description": "with SGZ_REDIS_URL: Redis down and the job not on this replica"},
}
ERRORS: Responses = {
    code: {"description": text}
    for code, text in {
        400: "empty upload, malformed multipart",
        401: "API key missing or wrong (only when SGZ_API_KEY is set)",
        413: "upload over SGZ_MAX_VIDEO_UPLOAD_BYTES, video over SGZ_MAX_VIDEO_DURATION_S or "
        "frames over SGZ_MAX_PIXELS",
        415: "not a video content type",
        422: "not a video this service reads, or a query parameter out of range",
        503: "too many jobs queued, job disk full, not ready: retry after Retry-After seconds",
    }.items()
}


def jobs(request: Request) -> SharedJobs:
    """This replica's jobs, and with SGZ_REDIS_URL the other replicas' (service/job_store.py)."""
    return request.app.state.jobs


@router.post("/jobs", status_code=202, openapi_extra=VIDEO_BODY, responses={202: JOB, **ERRORS})
async def create_job(
    request: Request,
    strength: Strength = 1.0,
    denoise: Denoise = DENOISE,
    exposure: Exposure = "auto",
    temporal: Annotated[
        bool,
        Query(
            description="keep brightness and noise steady from "
            "frame to frame; false: each frame on its own"
        ),
    ] = True,
    codec: Annotated[
        Literal["h264", "hevc", "vp9", "av1"],
        Query(description="output codec: MP4, or WebM for vp9"),
    ] = "h264",
    crf: Annotated[
        int | None,
        Query(
            description="constant quality, lower = better: "
            "0-51 (h264, hevc), 0-63 (vp9, av1); default 18"
        ),
    ] = None,
    preset: Annotated[
        str | None,
        Query(
            max_length=16, description="x264's speed names, ultrafast to veryslow; default medium"
        ),
    ] = None,
) -> JSONResponse:
    """Enhance a video in the background. Send it as the raw body (`Content-Type: video/*`
    or `application/octet-stream`) or as multipart field `video`. Answers 202 with the job
    and `Location: /jobs/{id}`; poll that until `state` is `done`, then fetch
    `/jobs/{id}/result`. Jobs do not survive a restart of the service."""
    level = exposure_level(exposure)
    given: dict[str, Any] = {k: v for k, v in (("crf", crf), ("preset", preset)) if v is not None}
    try:
        encoder = EncoderOptions(codec=codec, **given)
    except ValueError as e:
        raise ApiError(422, "invalid_parameter", str(e)) from None
    rt = runtime(request)
    rt.check_ready()
    job = await rt.jobs.create(request, JobOptions(strength, denoise, level, temporal, encoder))
    await jobs(request).created(job)
    return JSONResponse(job.view(), status_code=202, headers={"Location": f"/jobs/{job.id}"})


@router.get("/jobs/{job_id}", responses={200: JOB, **UNKNOWN})
async def get_job(request: Request, job_id: str) -> JSONResponse:
    """A job's state (queued, running, done, failed, cancelled), progress and options."""
    return JSONResponse((await jobs(request).find(job_id)).view())


@router.get(
    "/jobs/{job_id}/result",
    response_class=FileResponse,
    responses={
        200: {"content": {"video/mp4": {}, "video/webm": {}}, "description": "the enhanced video"},
        206: {"description": "the byte range asked for"},
        409: {"description": "the job is not done (yet, or ever)"},
        416: {"description": "the range starts past the end"},
        **UNKNOWN,
    },
)
async def get_result(request: Request, job_id: str) -> FileResponse:
    """The enhanced video (MP4, or WebM for vp9), with HTTP Range support."""
    job = await jobs(request).find(job_id)
    if job.state != DONE:
        code = {FAILED: "job_failed", CANCELLED: "job_cancelled"}.get(job.state, "job_not_done")
        why = f": {job.error}" if job.error else ""
        raise ApiError(
            409, code, f"job {job_id} is {job.state}{why}; a result exists only once it is done"
        )
    try:
        stat = os.stat(job.output)
    except FileNotFoundError:  # deleted or expired in between, or on a folder not shared
        raise await jobs(request).result_gone(job) from None
    _check_range(request.headers.get("range"), stat.st_size)
    return FileResponse(
        job.output,
        media_type=job.media_type,
        stat_result=stat,
        filename=f"{job_id}{job.output.suffix}",
    )


def _check_range(header: str | None, size: int) -> None:
    """Refuse a bad Range as a JSON error; FileResponse serves the good ones (206) but would
    answer these in plain text. Same parser as FileResponse's, so the two agree."""
    if header is None:
        return
    try:
        FileResponse._parse_range_header(header, size)
    except RangeNotSatisfiable:
        raise ApiError(
            416,
            "range_not_satisfiable",
            f"the range {header!r} starts past the end of the {size} bytes",
            {"Content-Range": f"bytes */{size}"},
        ) from None
    except MalformedRangeHeader as e:
        raise ApiError(400, "bad_range", f"Range {header!r}: {e.content}") from None


@router.delete("/jobs/{job_id}", responses={200: JOB, **UNKNOWN})
async def delete_job(request: Request, job_id: str) -> JSONResponse:
    """Cancel a queued or running job and delete its files (its record says `cancelled`
    until it expires); a finished job is deleted altogether. Answers with its final state."""
    return JSONResponse(await jobs(request).delete(job_id))
