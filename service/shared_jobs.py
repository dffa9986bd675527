"""Video jobs across replicas: what the job routes call. Without SGZ_REDIS_URL, the local
JobManager, exactly as with one process; with it, also each job's record in Redis
(service/job_store.py), so that any replica answers `GET /jobs/{id}`, serves the result and
cancels the job, whichever replica runs it.

The replica that took the upload runs the job and writes its record: when the job is created,
every SYNC_S while it is queued or running (progress; this keeps its TTL fresh), and once when
it has finished. Each write reads the `cancel` flag back: a DELETE on another replica reaches
the job within SYNC_S, and the owner cancels it as its own DELETE would.

Results stay files: another replica serves them from SGZ_JOBS_DIR, which must then be a folder
every replica mounts (docs/scaling.md). A finished job is deleted, files and record, by whichever
replica is asked. With Redis down, jobs are still made and answered locally, and an id this
replica does not hold gets 503 job_store_unavailable: it may exist on another replica.
"""

import asyncio
import json
import logging
import os
import shutil
import socket
import time

from .errors import ApiError
from .job_record import DONE, FINISHED, Job
from .job_store import JobStoreUnavailable, RedisJobStore, RemoteJob
from .jobs import STOP_WAIT_S, JobManager

log = logging.getLogger("sgz.jobs")

SYNC_S = 0.5  # how often the owner writes a running job's record and reads its cancel flag


class SharedJobs:
    """What the job routes call: the local JobManager, and with a store, the other replicas'
    jobs through Redis."""

    def __init__(self, manager: JobManager, store: RedisJobStore | None):
        self.manager, self.store = manager, store
        self.base = manager.root.parent  # SGZ_JOBS_DIR, or the system's temporary folder
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._final: set[str] = set()  # local jobs whose finished record is written
        self._tasks: dict[str, asyncio.Task] = {}  # local jobs being cancelled for a peer
        self._syncer: asyncio.Task | None = None

    @classmethod
    def open(cls, settings, manager: JobManager, registry=None) -> "SharedJobs":
        if not settings.redis_url:
            return cls(manager, None)
        store = RedisJobStore(
            settings.redis_url.get_secret_value(),
            ttl_s=settings.job_result_ttl_s,
            timeout_s=settings.redis_timeout_s,
            registry=registry,
        )
        return cls(manager, store)

    def start(self) -> None:
        if self.store is not None:
            self._syncer = asyncio.get_running_loop().create_task(self._sync_forever())

    async def close(self) -> None:
        """After the manager closed (its jobs cancelled, files removed): drop their records,
        so that other replicas answer 404 as this one would."""
        if self._syncer is not None:
            self._syncer.cancel()
        if self.store is not None:
            try:
                await self.store.delete(*self.manager.jobs)
            except JobStoreUnavailable:
                pass
            await self.store.close()

    # The owner's side -----------------------------------------------------------------------

    async def created(self, job: Job) -> None:
        """Write a new job's record at once: a poll on another replica may come next."""
        if self.store is not None:
            await self._write(job)

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                for job in list(self.manager.jobs.values()):
                    if job.id not in self._final and not await self._write(job):
                        break  # Redis unavailable: try again next time
                self._final &= set(self.manager.jobs)
            except Exception:  # never let the records stop following the jobs
                log.exception("writing the job records failed")

    async def _write(self, job: Job) -> bool:
        assert self.store is not None
        view = job.view()  # one snapshot: the job thread moves on meanwhile
        finished = view["state"] in FINISHED
        if finished and view["finished"] is None:  # `_run` sets it next: publish both together
            return True
        record = {
            "view": json.dumps(view),
            "owner": self.replica,
            "folder": str(job.folder.relative_to(self.base)),
            "result": job.output.name if view["state"] == DONE else "",
            "media_type": job.media_type,
        }
        try:
            cancel = await self.store.put(job.id, record)
        except JobStoreUnavailable:
            return False
        if finished:
            self._final.add(job.id)
        elif cancel and job.id not in self._tasks:  # a peer was asked to DELETE it
            log.info("job %s cancelled through another replica", job.id)
            task = asyncio.create_task(self.manager.delete(job))
            self._tasks[job.id] = task
            task.add_done_callback(lambda _: self._tasks.pop(job.id, None))
        return True

    # Any replica's side ---------------------------------------------------------------------

    async def find(self, job_id: str) -> Job | RemoteJob:
        local = self.manager.jobs.get(job_id)
        if self.store is None or (local is not None and job_id not in self._final):
            return self.manager.get(job_id)  # local and running: fresher than its record
        try:
            record = await self.store.get(job_id)
        except JobStoreUnavailable:
            if local is not None:
                return local
            raise self.unavailable() from None
        if local is not None:
            if record is not None:
                return local
            # finished, then deleted through another replica (or expired, or lost with a Redis
            # restart): gone for every replica, so here too
            self.manager.jobs.pop(job_id, None)
            await asyncio.to_thread(shutil.rmtree, local.folder, True)
            raise self.manager.unknown(job_id)
        remote = None if record is None else RemoteJob.parse(job_id, record, self.base)
        if remote is None:
            raise self.manager.unknown(job_id)
        return remote

    async def delete(self, job_id: str) -> dict:
        job = await self.find(job_id)
        if isinstance(job, Job):
            finished = job.state in FINISHED
            view = await self.manager.delete(job)
            if self.store is not None and finished:
                await self._forget(job_id)  # a finished job goes altogether
            return view  # a cancelled one: the syncer writes its last state
        if job.state not in FINISHED:
            job = await self._cancel_remote(job)
            if job.state != DONE:  # stopped: its record stays until it expires, as on its replica
                return job.view()
        await asyncio.to_thread(shutil.rmtree, job.folder, True)
        await self._forget(job_id)
        return job.view()

    async def _cancel_remote(self, job: RemoteJob) -> RemoteJob:
        """Raise the flag, then wait for the owner to say the job stopped (as a local DELETE
        waits for it), at most STOP_WAIT_S."""
        assert self.store is not None
        end = time.monotonic() + STOP_WAIT_S
        try:
            if not await self.store.cancel(job.id):
                raise self.manager.unknown(job.id)
            while time.monotonic() < end:
                await asyncio.sleep(0.1)
                record = await self.store.get(job.id)
                found = None if record is None else RemoteJob.parse(job.id, record, self.base)
                if found is None:
                    raise self.manager.unknown(job.id)
                if found.state in FINISHED:
                    return found
                job = found
        except JobStoreUnavailable:
            raise self.unavailable() from None
        log.warning(
            "job %s: replica %s has not stopped it in %.0f s", job.id, job.owner, STOP_WAIT_S
        )
        return job

    async def _forget(self, job_id: str) -> None:
        assert self.store is not None
        try:
            await self.store.delete(job_id)
        except JobStoreUnavailable:
            log.warning("job %s deleted here; its record in Redis stays until it expires", job_id)

    async def result_gone(self, job: Job | RemoteJob) -> ApiError:
        """The error for a done job whose result file is not here."""
        if isinstance(job, RemoteJob):
            try:
                still = await self.store.get(job.id) if self.store is not None else None
            except JobStoreUnavailable:
                return self.unavailable()
            if still is not None:  # not deleted: this replica cannot see the owner's folder
                return ApiError(
                    503,
                    "job_result_unavailable",
                    f"job {job.id} is done on replica {job.owner}, but its result is not in "
                    f"this replica's jobs folder {self.base}: SGZ_JOBS_DIR must be a folder "
                    "every replica mounts (docs/scaling.md)",
                )
        return ApiError(404, "unknown_job", f"job {job.id} was just deleted")

    def unavailable(self) -> ApiError:
        return ApiError(
            503,
            "job_store_unavailable",
            "the store of video jobs (Redis) cannot be reached, and this replica does not run "
            "this job; retry later",
            {"Retry-After": str(self.manager.settings.retry_after_s)},
        )
