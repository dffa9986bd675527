"""Video jobs: an uploaded video enhanced in the background, its result downloaded later.

Each job owns a folder under the manager's root (a fresh folder, removed at shutdown) holding
the upload and the result. Jobs live in memory and in that folder only: none survives a
restart. A small pool runs them (`max_running_jobs`); the queue in front of it is bounded
(`max_queued_jobs`); finished jobs are forgotten, files and all, `job_result_ttl_s` after
they finish. With SGZ_REDIS_URL, service/shared_jobs.py shows them to the other replicas.

The model steps of a job run in the batcher's inference thread, the one that runs image
batches, so the two take turns on the model (see `JobManager._run_model`).
"""

import asyncio
import logging
import os
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from model import Enhancer
from model.video import Cancelled, VideoError, VideoInfo, enhance_video, probe

from .batching import Batcher
from .errors import ApiError
from .job_record import (
    CANCELLED,
    DONE,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    STATES,
    UPLOAD,
    Job,
    JobOptions,
)
from .metrics import Metrics
from .settings import Settings
from .uploads import save_video

log = logging.getLogger("sgz.jobs")

STOP_WAIT_S = 30.0  # how long DELETE waits for a running job to stop before answering


class JobManager:
    def __init__(
        self,
        settings: Settings,
        enhancer: Enhancer,
        batcher: Batcher,
        metrics: Metrics,
        thread_initializer=None,
    ):
        self.settings, self.enhancer, self.batcher, self.metrics = (
            settings,
            enhancer,
            batcher,
            metrics,
        )
        if settings.jobs_dir is not None:
            settings.jobs_dir.mkdir(parents=True, exist_ok=True)
        # our own folder even inside SGZ_JOBS_DIR: removing it at shutdown removes only ours
        self.root = Path(tempfile.mkdtemp(prefix="sgz-jobs-", dir=settings.jobs_dir))
        # shared by the replicas (SGZ_REDIS_URL): the disk budget is for all of them together
        shared = settings.jobs_dir if settings.redis_url is not None else None
        self.disk_root = shared or self.root
        self.jobs: dict[str, Job] = {}
        self.pool = ThreadPoolExecutor(
            settings.max_running_jobs, thread_name_prefix="sgz-job", initializer=thread_initializer
        )
        self.closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task | None = None
        for state in STATES:
            metrics.jobs.labels(state).set_function(partial(self.count, state))

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sweeper = self._loop.create_task(self._sweep_forever(), name="sgz-job-sweeper")

    def count(self, state: str) -> int:
        return sum(job.state == state for job in list(self.jobs.values()))

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise self.unknown(job_id)
        return job

    def unknown(self, job_id: str) -> ApiError:
        return ApiError(
            404,
            "unknown_job",
            f"no job {job_id!r}: unknown, deleted, or "
            f"finished more than {self.settings.job_result_ttl_s:g} s ago "
            "(SGZ_JOB_RESULT_TTL_S); jobs do not survive a restart",
        )

    # Creating -----------------------------------------------------------------------------

    async def create(self, request, options: JobOptions) -> Job:
        """Stream the upload to disk, probe it, queue the job. Nothing is left behind when
        any step refuses it."""
        self._check_room()
        used = await asyncio.to_thread(_disk_used, self.disk_root)
        length = request.headers.get("content-length", "")
        self._check_disk(used, int(length) if length.isdigit() else 0)
        job_id = uuid.uuid4().hex
        folder = self.root / job_id
        folder.mkdir()
        try:
            size = await save_video(
                request,
                folder / UPLOAD,
                self.settings.max_video_upload_bytes,
                partial(self._check_disk, used),
            )
            if size == 0:
                raise ApiError(400, "empty_video", "the upload is empty: no video bytes")
            try:
                info = await asyncio.to_thread(probe, folder / UPLOAD)
            except VideoError as e:
                raise ApiError(422, "invalid_video", str(e)) from None
            self._check_video(info)
            self._check_room()  # again: others may have queued while this one uploaded
            job = Job(job_id, folder, options, info, size)
            self.jobs[job_id] = job
            job.future = self.pool.submit(self._run, job)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, folder, True)
            raise
        log.info(
            "job %s queued: %dx%d, %s frames, %d bytes",
            job_id,
            info.width,
            info.height,
            info.frames,
            size,
        )
        return job

    def _check_room(self) -> None:
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        if self.closing:
            raise ApiError(503, "shutting_down", "the service is shutting down", retry)
        if self.count(QUEUED) >= self.settings.max_queued_jobs:
            raise ApiError(
                503,
                "too_many_jobs",
                f"{self.count(QUEUED)} video jobs are "
                f"already waiting (SGZ_MAX_QUEUED_JOBS); retry later",
                retry,
            )

    def _check_disk(self, used: int, size: int) -> None:
        limit = self.settings.max_jobs_disk_bytes
        if used + size > limit:
            raise ApiError(
                503,
                "disk_full",
                f"video jobs already use {used} of the {limit} "
                "bytes of disk they may (SGZ_MAX_JOBS_DISK_BYTES); retry once some "
                "have been fetched or expired",
                {"Retry-After": str(self.settings.retry_after_s)},
            )

    def _check_video(self, info: VideoInfo) -> None:
        s = self.settings
        if info.width * info.height > s.max_pixels:
            raise ApiError(
                413,
                "video_too_large",
                f"frames of {info.width}x{info.height} are "
                f"over {s.max_pixels} pixels (SGZ_MAX_PIXELS)",
            )
        seconds = info.duration
        if seconds is None and info.frames and info.fps:
            seconds = info.frames / info.fps
        if seconds is not None and seconds > s.max_video_duration_s:
            raise ApiError(
                413,
                "video_too_long",
                f"the video lasts {seconds:.1f} s; this "
                f"service takes at most {s.max_video_duration_s:g} s "
                "(SGZ_MAX_VIDEO_DURATION_S)",
            )

    # Running (in a pool thread) -------------------------------------------------------------

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():  # cancelled while queued, just as it was about to start
            job.state, job.finished = CANCELLED, time.time()
            return
        job.state, job.started = RUNNING, time.time()
        job.frames_total = job.info.frames
        o = job.options
        try:
            stats = enhance_video(
                self.enhancer,
                job.upload,
                job.output,
                strength=o.strength,
                denoise=o.denoise,
                exposure=o.exposure,
                temporal=o.temporal,
                encoder=o.encoder,
                progress=partial(self._progress, job),
                cancel=job.cancel,
                run_model=self._run_model,
            )
        except Cancelled:
            if job.too_long:
                job.state, job.error = (
                    FAILED,
                    (
                        f"the video runs past {self.settings.max_video_duration_s:g} s "
                        "(SGZ_MAX_VIDEO_DURATION_S); stopped"
                    ),
                )
            else:
                job.state = CANCELLED
        except VideoError as e:
            job.state, job.error = FAILED, str(e)
        except Exception as e:
            log.exception("job %s failed", job.id)
            job.state, job.error = FAILED, f"{type(e).__name__}: {e}"
        else:
            job.frames_done = job.frames_total = stats.frames
            job.output_bytes = job.output.stat().st_size
            job.dropped_streams = list(stats.dropped_streams)
            job.state = DONE
        finally:
            job.finished = time.time()
            self.metrics.job_duration.labels(job.state).observe(job.finished - job.started)
            job.upload.unlink(missing_ok=True)  # the disk budget is for results now
            if job.state != DONE:
                shutil.rmtree(job.folder, ignore_errors=True)
        log.info(
            "job %s %s: %d frames in %.1f s%s",
            job.id,
            job.state,
            job.frames_done,
            job.finished - job.started,
            f" ({job.error})" if job.error else "",
        )

    def _progress(self, job: Job, done: int, total: int | None) -> None:
        self.metrics.video_frames.inc(max(0, done - job.frames_done))
        job.frames_done = done
        if total:
            job.frames_total = total
        fps = job.info.fps
        if fps and done / fps > self.settings.max_video_duration_s:  # no duration in the file
            job.too_long = True
            job.cancel.set()

    def _run_model(self, fn, *args):
        """One model step of a job's frames, in the inference thread. Image requests first:
        wait while any are queued, but at most job_yield_ms, so a steady image load delays
        each image by at most one frame batch and still leaves the job a turn per wait."""
        end = time.monotonic() + self.settings.job_yield_ms / 1000
        while self.batcher.depth and time.monotonic() < end:
            time.sleep(0.002)
        return asyncio.run_coroutine_threadsafe(
            self.batcher.run_in_worker(fn, *args), self._loop
        ).result()

    # Deleting, expiring, closing -------------------------------------------------------------

    async def delete(self, job: Job) -> dict:
        """Cancel a queued or running job and remove its files, keeping its record (state
        cancelled) until it expires; a finished job is forgotten altogether."""
        if job.state in FINISHED:
            self.jobs.pop(job.id, None)
            await asyncio.to_thread(shutil.rmtree, job.folder, True)
            return job.view()
        job.cancel.set()
        future = job.future
        assert future is not None  # set in the same step as the job is listed (`create`)
        if future.cancel():  # still queued: it never starts
            job.state, job.finished = CANCELLED, time.time()
        else:
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), STOP_WAIT_S)
            except TimeoutError:
                log.warning("job %s still stopping after %.0f s", job.id, STOP_WAIT_S)
        await asyncio.to_thread(shutil.rmtree, job.folder, True)
        return job.view()

    def sweep(self) -> list[Job]:
        """Forget the jobs finished more than the TTL ago; returns them (their files go)."""
        cutoff = time.time() - self.settings.job_result_ttl_s
        old = [j for j in list(self.jobs.values()) if j.finished and j.finished < cutoff]
        for job in old:
            self.jobs.pop(job.id, None)
        return old

    async def _sweep_forever(self) -> None:
        interval = min(60.0, self.settings.job_result_ttl_s / 4)
        while True:
            await asyncio.sleep(interval)
            for job in self.sweep():
                await asyncio.to_thread(shutil.rmtree, job.folder, True)

    async def close(self) -> None:
        """Cancel every job, wait for the running ones to stop, remove every file."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for job in list(self.jobs.values()):
            job.cancel.set()
            if job.future is not None and job.future.cancel():
                job.state, job.finished = CANCELLED, time.time()
        await asyncio.to_thread(self.pool.shutdown, wait=True)
        await asyncio.to_thread(shutil.rmtree, self.root, True)


def _disk_used(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:  # a temporary file renamed or removed meanwhile
                pass
    return total
