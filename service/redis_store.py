"""Factor maps in Redis (SGZ_REDIS_URL), so that any replica answers `GET /factor/{id}` for a
map another replica made. Same interface as `FactorStore` (service/factor_store.py).

Layout, all under the prefix `sgz:factor:`:
  sgz:factor:<id>       the map: a 20-byte header (magic, H, W, h, w) + float32 (3, h, w)
  sgz:factor:index      sorted set of ids by the time they were stored (Redis's clock)
  sgz:factor:sizes      hash id -> bytes
  sgz:factor:bytes      the bytes of all maps in the index
Each map has the TTL `factor_ttl_s`. A Lua script stores a map atomically and, first, drops
from the index the maps past their TTL, then the oldest until the new one fits the count and
byte budget (`factor_store_items`, `factor_store_bytes`, for all replicas together): the same
oldest-first bound as in memory, exact across replicas and independent of what else lives in
that Redis. Redis's own `maxmemory` + `volatile-ttl` is the backstop (docs/scaling.md).

A Redis that is down must never stall requests: every call has a short timeout
(`redis_timeout_s`) and one immediate retry (for a pooled connection that a Redis restart
closed), and after a failure the store does not call Redis for BREAKER_S. Meanwhile `save`
returns None (the answer has no X-Factor-ID), `load` raises FactorStoreUnavailable (503).
"""

import logging
import struct
import time

import numpy as np
import torch
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .factor_store import FactorStoreUnavailable, StoredFactor, new_factor_id

log = logging.getLogger("sgz.service")

PREFIX = "sgz:factor:"
HEADER = struct.Struct("<4s4I")  # magic, H, W, h, w
MAGIC = b"SGZ1"
BREAKER_S = 1.0  # after a failure, how long calls fail at once instead of waiting on Redis

# KEYS: index, sizes, bytes. ARGV: prefix, id, value, nbytes, ttl_ms, max_bytes, max_items.
PUT = """
local index, sizes, total_key = KEYS[1], KEYS[2], KEYS[3]
local prefix, id, value = ARGV[1], ARGV[2], ARGV[3]
local nbytes, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local max_bytes, max_items = tonumber(ARGV[6]), tonumber(ARGV[7])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local total = tonumber(redis.call('GET', total_key) or '0')
local function drop(member)
  total = total - tonumber(redis.call('HGET', sizes, member) or '0')
  redis.call('HDEL', sizes, member)
  redis.call('ZREM', index, member)
  redis.call('DEL', prefix .. member)
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', now - ttl)) do
  drop(member)
end
while redis.call('ZCARD', index) > 0 and
      (redis.call('ZCARD', index) >= max_items or total + nbytes > max_bytes) do
  drop(redis.call('ZRANGE', index, 0, 0)[1])
end
-- after the newest even within the same millisecond, so the oldest is always dropped first
-- (formatted: Lua would print a fractional score with too few digits)
local newest = redis.call('ZRANGE', index, -1, -1, 'WITHSCORES')[2]
local score = now
if newest and tonumber(newest) >= score then score = tonumber(newest) + 0.001 end
redis.call('SET', prefix .. id, value, 'PX', ttl)
redis.call('ZADD', index, string.format('%.3f', score), id)
redis.call('HSET', sizes, id, nbytes)
total = total + nbytes
redis.call('SET', total_key, total, 'PX', ttl)
redis.call('PEXPIRE', index, ttl)
redis.call('PEXPIRE', sizes, ttl)
return total
"""


def pack(entry: StoredFactor) -> bytes:
    _, h, w = entry.lowres.shape
    body = (
        entry.lowres.detach()
        .to("cpu", torch.float32)
        .contiguous()
        .numpy()
        .astype("<f4", copy=False)
        .tobytes()
    )
    return HEADER.pack(MAGIC, *entry.size, h, w) + body


def unpack(data: bytes) -> StoredFactor:
    magic, height, width, h, w = HEADER.unpack_from(data)
    if magic != MAGIC or len(data) != HEADER.size + 3 * h * w * 4:
        raise ValueError("not a factor map of this version")
    lowres = np.frombuffer(data, "<f4", offset=HEADER.size).reshape(3, h, w)
    return StoredFactor(torch.from_numpy(lowres.copy()), (height, width))


class Breaker:
    """Redis calls that fail fast: after a failure every call fails at once for BREAKER_S, so a
    dead Redis costs a request at most one short wait a second; one log line when Redis goes
    away and one when it is back. Shared by the factor and the job stores."""

    def __init__(self, errors: Counter, unavailable: type[Exception], lost: str, back: str):
        self.errors, self.unavailable, self.lost, self.back = errors, unavailable, lost, back
        self.down_until = 0.0  # monotonic time until which Redis is not called
        self.down = False

    async def call(self, operation: str, fn, *args, **kwargs):
        if time.monotonic() < self.down_until:
            raise self.unavailable("Redis failed a call less than a second ago")
        try:
            result = await fn(*args, **kwargs)
        except (RedisError, OSError) as e:
            self.errors.labels(operation).inc()
            self.down_until = time.monotonic() + BREAKER_S
            if not self.down:
                name = type(e).__name__
                log.warning("Redis unavailable (%s: %s): %s until it is back", name, e, self.lost)
            self.down = True
            raise self.unavailable(f"Redis: {type(e).__name__}") from None
        if self.down:
            log.info("Redis is back: %s", self.back)
            self.down = False
        return result


class RedisFactorStore:
    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        max_items: int,
        max_bytes: int,
        max_map_bytes: int,
        ttl_s: float,
        timeout_s: float,
        registry=None,
    ):
        self.max_items, self.max_bytes = max_items, max_bytes
        self.max_map_bytes, self.ttl_ms = max_map_bytes, max(1, int(ttl_s * 1000))
        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
        self._put = self._redis.register_script(PUT)
        self.errors = Counter(
            "sgz_factor_store_errors",
            "Factor store calls that failed (Redis unreachable or too slow), by operation",
            ["operation"],
            registry=registry,
        )
        self._breaker = Breaker(
            self.errors,
            FactorStoreUnavailable,
            "factor maps are not kept",
            "factor maps are kept again",
        )

    @classmethod
    def from_settings(cls, settings, registry=None) -> "RedisFactorStore":
        return cls(
            settings.redis_url.get_secret_value(),
            max_items=settings.factor_store_items,
            max_bytes=settings.factor_store_bytes,
            max_map_bytes=settings.factor_map_max_bytes,
            ttl_s=settings.factor_ttl_s,
            timeout_s=settings.redis_timeout_s,
            registry=registry,
        )

    async def save(self, lowres: torch.Tensor, size: tuple[int, int]) -> str | None:
        """Store a map under a new id; None when it can never fit or Redis is unavailable."""
        entry = StoredFactor(lowres, (size[0], size[1]))
        if self.max_items == 0 or entry.nbytes > min(self.max_bytes, self.max_map_bytes):
            return None
        factor_id = new_factor_id()
        try:
            await self._call(
                "save",
                self._put,
                keys=[PREFIX + "index", PREFIX + "sizes", PREFIX + "bytes"],
                args=[
                    PREFIX,
                    factor_id,
                    pack(entry),
                    entry.nbytes,
                    self.ttl_ms,
                    self.max_bytes,
                    self.max_items,
                ],
            )
        except FactorStoreUnavailable:
            return None
        return factor_id

    async def load(self, factor_id: str) -> StoredFactor | None:
        data = await self._call("load", self._redis.get, PREFIX + factor_id)
        if data is None:
            return None
        try:
            return unpack(data)
        except (ValueError, struct.error):  # written by another version: as if evicted
            log.warning("factor map %s in Redis is unreadable; ignored", factor_id[:8])
            return None

    async def status(self) -> dict:
        try:
            await self._call("ping", self._redis.ping)
        except FactorStoreUnavailable:
            return {"backend": self.backend, "available": False}
        return {"backend": self.backend, "available": True}

    async def close(self) -> None:
        await self._redis.aclose()

    async def _call(self, operation: str, fn, *args, **kwargs):
        return await self._breaker.call(operation, fn, *args, **kwargs)
