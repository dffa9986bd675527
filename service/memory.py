"""Memory the service gives back when it goes idle.

A burst of large images leaves glibc's heaps full of freed blocks: buffers of a few MB each,
under the mmap threshold (which glibc raises as large blocks come and go), that `free` keeps for
the next burst. RSS then stays at the burst's peak for good (docs/service.md, "Memory, and a
soak"). Once no batch has run for `idle_s`, `Trimmer` calls glibc's
`malloc_trim(0)`, which returns every free page of every heap to the kernel; the next burst
page-faults its buffers in again, a cost paid once per burst, not per request.
"""

import asyncio
import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger("sgz.memory")


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere (musl, macOS): nothing to do there."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


MALLOC_TRIM = _malloc_trim()


def rss_bytes() -> int:
    """This process's resident memory (Linux), 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Trimmer:
    """Trim once per idle spell: after the batcher's last batch, when `idle_s` passed with no
    new batch and nothing queued."""

    def __init__(self, batcher, idle_s: float, on_trim=None):
        self.batcher, self.idle_s, self.on_trim = batcher, idle_s, on_trim
        self.trimmed_at = -1  # the batch count at the last trim

    async def run(self) -> None:
        if MALLOC_TRIM is None or self.idle_s <= 0:
            return
        while True:
            await asyncio.sleep(min(1.0, self.idle_s / 2))
            b = self.batcher
            idle = time.monotonic() - b.last_done >= self.idle_s and b.depth == 0
            if idle and b.batches != self.trimmed_at:
                self.trimmed_at = b.batches
                try:
                    await self.trim()
                except Exception:  # never let one failure end trimming for good
                    log.exception("malloc_trim failed")

    async def trim(self) -> None:
        before = rss_bytes()
        await asyncio.to_thread(MALLOC_TRIM, 0)
        after = rss_bytes()
        log.debug(
            "idle: malloc_trim gave back %.0f MB (RSS %.0f MB)",
            (before - after) / 2**20,
            after / 2**20,
        )
        if self.on_trim is not None:  # RSS can grow meanwhile (other threads): a counter
            self.on_trim(max(0, before - after))  # only goes up
