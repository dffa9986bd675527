"""Async micro-batching: requests that arrive close together share one forward pass.

Jobs are grouped by a key (for images: task and size, so a batch is one stacked tensor and
nothing is padded). A group is sent to the model when it holds `max_batch_size` jobs, when it
holds `max_batch_pixels` pixels, or when its oldest job has waited `max_wait_s` since it
*arrived* (the caller's arrival time, not the moment a worker looked at the queue: TorchServe
#2478), or at once when the caller says no more jobs are on their way (`coming() == 0`):
waiting then cannot grow the batch and only adds latency (a lone client paid the full
max_wait on every request). While one batch runs, the next ones fill up, so under load
batches grow on their own.

- One worker thread runs every batch: the event loop never blocks on the model, and one
  thread owns the device.
- The queue is bounded: `submit` raises QueueFull at once when `max_queue_size` jobs wait.
- At its deadline a job's caller gets DeadlineExceeded: a queued job is withdrawn and never
  computed; one whose batch is running is computed with it and its result dropped.
- A job whose client has gone (`is_disconnected()`) is dropped before its batch runs.
- An exception while running a batch fails that batch's jobs only (BatchFailed); the loop goes
  on. Anything else going wrong in the loop fails the jobs at hand, never the loop.
"""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sgz.batching")


class BatchingError(Exception):
    """Base of the errors `Batcher.submit` raises."""


class QueueFull(BatchingError):
    pass


class BatcherClosed(BatchingError):
    pass


class DeadlineExceeded(BatchingError):
    pass


class ClientDisconnected(BatchingError):
    pass


class BatchFailed(BatchingError):
    pass


@dataclass(frozen=True)
class Result:
    value: Any  # what run_batch returned for this job
    queue_s: float  # queued -> its batch started
    inference_s: float  # the batch's run time
    batch_size: int


@dataclass(eq=False)
class _Job:
    payload: Any
    key: Hashable
    pixels: int
    arrival: float  # when the request arrived: starts the max_wait timer
    queued: float  # when it was queued: starts its queue wait
    deadline: float
    is_disconnected: Callable[[], Awaitable[bool]] | None
    future: asyncio.Future
    started: bool = False


class Batcher:
    """`run_batch(payloads) -> values` (one value per payload) is called in the worker thread
    with payloads that share a key. `on_batch(size, pixels, seconds)` and `on_drop(reason)` are
    observation hooks (metrics); they run on the event loop. `worker_initializer` runs once in
    the worker thread when it starts. `coming()`, when given, counts the jobs on their way
    (requests still being read or decoded, for the service): none coming, nothing is worth
    waiting for.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        *,
        max_batch_size: int = 16,
        max_batch_pixels: int = 1 << 24,
        max_wait_s: float = 0.005,
        max_queue_size: int = 256,
        on_batch: Callable[[int, int, float], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        worker_initializer: Callable[[], None] | None = None,
        coming: Callable[[], int] | None = None,
    ):
        self.run_batch = run_batch
        self.coming = coming
        self.max_batch_size = max_batch_size
        self.max_batch_pixels = max_batch_pixels
        self.max_wait_s = max_wait_s
        self.max_queue_size = max_queue_size
        self.on_batch = on_batch
        self.on_drop = on_drop
        self._groups: dict[Hashable, deque[_Job]] = {}
        self._depth = 0
        self._wakeup = asyncio.Event()
        self._worker = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sgz-inference", initializer=worker_initializer
        )
        self._task: asyncio.Task | None = None
        self._closing = False
        self.batches = 0  # batches run so far
        self.last_done = time.monotonic()  # when the last one finished (memory.Trimmer)

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the batch that is running)."""
        return self._depth

    @property
    def full(self) -> bool:
        return self._depth >= self.max_queue_size

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="sgz-batcher")

    async def close(self) -> None:
        """Refuse new jobs, run every queued one, stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._worker.shutdown(wait=True)

    async def run_in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn` in the inference thread, outside the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def submit(
        self,
        payload: Any,
        *,
        key: Hashable = None,
        pixels: int = 1,
        arrival: float | None = None,
        deadline: float = float("inf"),
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> Result:
        """Queue one job and wait for its result. `arrival` and `deadline` are
        `time.monotonic()` times; `arrival` defaults to now."""
        if self._closing or self._task is None or self._task.done():
            raise BatcherClosed("the service is shutting down")
        if self.full:
            raise QueueFull(
                f"{self._depth} images are already waiting (max_queue_size={self.max_queue_size})"
            )
        now = time.monotonic()
        if now >= deadline:
            self._dropped("deadline")
            raise DeadlineExceeded("the request's deadline passed before it was queued")
        job = _Job(
            payload,
            key,
            pixels,
            now if arrival is None else arrival,
            now,
            deadline,
            is_disconnected,
            asyncio.get_running_loop().create_future(),
        )
        self._groups.setdefault(key, deque()).append(job)
        self._depth += 1
        self._wakeup.set()
        try:
            timeout = None if deadline == float("inf") else deadline - now
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            queued = self._withdraw(job)
            if queued:
                self._dropped("deadline")
            raise DeadlineExceeded(
                "the request's deadline passed while it was "
                + ("queued; it was not computed" if queued else "being computed")
            ) from None
        except asyncio.CancelledError:
            self._withdraw(job)
            raise

    def _withdraw(self, job: _Job) -> bool:
        """Take a job back (its submitter gave up); True when it had not started."""
        job.future.cancel()
        group = self._groups.get(job.key)
        if group is not None and job in group:
            group.remove(job)
            self._depth -= 1
            if not group:
                del self._groups[job.key]
        return not job.started

    def _dropped(self, reason: str) -> None:
        if self.on_drop is not None:
            self.on_drop(reason)

    # The loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            if not self._groups:
                if self._closing:
                    return
                await self._sleep(None)
                continue
            key, due = self._next_due()
            delay = due - time.monotonic()
            if delay > 0 and not self._closing:
                await self._sleep(delay)
                continue
            jobs = self._take(key)
            try:
                jobs = await self._live(jobs)
                if jobs:
                    await self._execute(jobs)
            except Exception as e:  # a bug in a hook must not stop the batcher
                log.exception("batcher: unexpected error; failing %d jobs", len(jobs))
                self._fail(jobs, e)

    def _next_due(self) -> tuple[Hashable, float]:
        """The group to run next and when it is due: a full group since its oldest job
        arrived (so is any group when no job is coming), any other when its oldest job has
        waited max_wait_s. The earliest due goes first, so a group that never fills (a rare
        image size) cannot be starved by groups that keep filling under load."""
        nothing_coming = self.coming is not None and self.coming() == 0

        def due(group: deque[_Job]) -> tuple[float, float]:
            head = group[0].arrival
            full = (
                nothing_coming
                or len(group) >= self.max_batch_size
                or sum(j.pixels for j in group) >= self.max_batch_pixels
            )
            return (head if full else head + self.max_wait_s), head

        key = min(self._groups, key=lambda k: due(self._groups[k]))
        return key, due(self._groups[key])[0]

    async def _sleep(self, timeout: float | None) -> None:
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            pass
        self._wakeup.clear()

    def _take(self, key: Hashable) -> list[_Job]:
        group = self._groups[key]
        jobs: list[_Job] = []
        pixels = 0
        while group and len(jobs) < self.max_batch_size:
            if jobs and pixels + group[0].pixels > self.max_batch_pixels:
                break
            job = group.popleft()
            jobs.append(job)
            pixels += job.pixels
        self._depth -= len(jobs)
        if not group:
            del self._groups[key]
        return jobs

    async def _live(self, jobs: list[_Job]) -> list[_Job]:
        """Drop jobs nobody waits for any more, before spending a forward pass on them."""
        live = []
        now = time.monotonic()
        for job in jobs:
            if job.future.done():  # withdrawn by its submitter
                continue
            if now >= job.deadline:
                job.future.set_exception(
                    DeadlineExceeded("the request's deadline passed while it was queued")
                )
                self._dropped("deadline")
            elif job.is_disconnected is not None and await job.is_disconnected():
                job.future.set_exception(ClientDisconnected("the client disconnected"))
                self._dropped("disconnected")
            else:
                live.append(job)
        return live

    async def _execute(self, jobs: list[_Job]) -> None:
        for job in jobs:
            job.started = True
        start = time.monotonic()
        payloads = [job.payload for job in jobs]
        try:
            values, seconds = await asyncio.get_running_loop().run_in_executor(
                self._worker, _timed, self.run_batch, payloads
            )
            if len(values) != len(jobs):
                raise RuntimeError(f"run_batch returned {len(values)} values for {len(jobs)} jobs")
        except Exception as e:
            log.exception("batch of %d failed", len(jobs))
            self._fail(jobs, e)
            return
        self.batches += 1
        self.last_done = time.monotonic()
        for job, value in zip(jobs, values):
            if not job.future.done():
                job.future.set_result(Result(value, start - job.queued, seconds, len(jobs)))
        if self.on_batch is not None:
            self.on_batch(len(jobs), sum(job.pixels for job in jobs), seconds)

    @staticmethod
    def _fail(jobs: list[_Job], error: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                failure = BatchFailed(f"inference failed: {type(error).__name__}: {error}")
                failure.__cause__ = error
                job.future.set_exception(failure)


def _timed(fn: Callable[[list[Any]], Sequence[Any]], payloads: list[Any]):
    start = time.perf_counter()
    values = fn(payloads)
    return values, time.perf_counter() - start
