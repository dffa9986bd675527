"""Video job records in Redis (SGZ_REDIS_URL), so that any replica answers for a job another
replica runs (service/shared_jobs.py does that with them).

  sgz:job:<id>   a hash: `view` (the JSON of GET /jobs/{id}), `owner` (replica id), `folder`
                 and `result` (the job's folder under the jobs folder, the result's file name),
                 `media_type`; and `cancel` = "1", set by another replica asked to DELETE it
Every write sets the TTL `job_result_ttl_s`, as long as the owner keeps a finished job. Calls
have the short timeouts, the one retry and the breaker of service/redis_store.py: a Redis that
is down costs a request at most one short wait a second (redis_store.Breaker).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .redis_store import Breaker

log = logging.getLogger("sgz.jobs")

KEY = "sgz:job:"
# set the flag only on a record that exists: a job already expired must not come back without a TTL
CANCEL = """if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return 1
end
return 0"""


class JobStoreUnavailable(Exception):
    """Redis cannot be reached: a job this replica does not run cannot be looked up."""


class RedisJobStore:
    """The records, with the short timeouts and the breaker of service/redis_store.py."""

    def __init__(self, url: str, *, ttl_s: float, timeout_s: float, registry=None):
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            decode_responses=True,
        )
        self._cancel = self._redis.register_script(CANCEL)
        self.errors = Counter(
            "sgz_job_store_errors",
            "Job store calls that failed (Redis unreachable or too slow), by operation",
            ["operation"],
            registry=registry,
        )
        self._breaker = Breaker(
            self.errors, JobStoreUnavailable, "jobs are local", "job records are shared again"
        )

    async def put(self, job_id: str, record: dict[str, str]) -> bool:
        """Write a record (and its TTL); True when another replica asked to cancel the job."""

        async def write():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(KEY + job_id, mapping=record)
                pipe.pexpire(KEY + job_id, self.ttl_ms)
                pipe.hget(KEY + job_id, "cancel")
                return (await pipe.execute())[-1]

        return await self._call("put", write) == "1"

    async def get(self, job_id: str) -> dict[str, str] | None:
        return await self._call("get", self._redis.hgetall, KEY + job_id) or None

    async def cancel(self, job_id: str) -> bool:
        """Ask the owner to cancel; False when there is no such record (any more)."""
        return bool(await self._call("cancel", self._cancel, keys=[KEY + job_id]))

    async def delete(self, *job_ids: str) -> None:
        if job_ids:
            await self._call("delete", self._redis.delete, *(KEY + i for i in job_ids))

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, operation: str, fn, *args, **kwargs):
        return await self._breaker.call(operation, fn, *args, **kwargs)


@dataclass(frozen=True)
class RemoteJob:
    """A job another replica runs, as its record says; routes use it like a `Job`."""

    id: str
    data: dict  # the view
    owner: str
    folder: Path
    result: str
    media_type: str

    @classmethod
    def parse(cls, job_id: str, record: dict[str, str], base: Path) -> "RemoteJob | None":
        """None for a record this version cannot read, or whose folder is not this job's in the
        jobs folder (a replica deletes that folder)."""
        try:
            folder = (base / record["folder"]).resolve()
            job = cls(
                job_id,
                json.loads(record["view"]),
                record["owner"],
                folder,
                record["result"],
                record["media_type"],
            )
        except (KeyError, ValueError):
            return None
        inside = folder.name == job_id and folder.parent.is_relative_to(base.resolve())
        return job if inside and Path(job.result).name == job.result else None

    @property
    def state(self) -> str:
        return self.data["state"]

    @property
    def error(self) -> str | None:
        return self.data.get("error")

    @property
    def output(self) -> Path:
        return self.folder / (self.result or "output")

    def view(self) -> dict:
        return self.data
