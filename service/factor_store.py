"""Recent factor maps, for `GET /factor/{factor_id}`.

Each map is kept under an id the server makes (192 random bits, returned in `X-Factor-ID`),
never under a name the client chose: knowing or sending someone's `X-Request-ID` gives no
access to their map. Maps are kept at EFE's resolution, as
`Enhancer.enhance(return_factor=True)` returns them, and upsampled only when asked for: with
the published scale factor 12 that is 144x less memory than the full-size map. Bounded by
count, by bytes and by age; the oldest go first. Used from the event loop only, so it needs
no lock.

Two stores with one async interface (`save`, `load`, `status`, `close`), picked by
`open_factor_store`: `FactorStore` in this process (the default), or with SGZ_REDIS_URL
`RedisFactorStore` (service/redis_store.py), shared by every replica.

A full-size float map is large (4K: 99.5 MB), so it is never built whole: `npy_strips` yields
it in strips of about STRIP_BYTES, each computed when the client has taken the previous one.
"""

import io
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from model import upsample_factor
from model.imageio import encode_image, factor_to_picture

ID_BYTES = 24  # 192 bits: 32 URL-safe characters
STRIP_BYTES = 1 << 20  # what a reader that stops reading pins, besides the socket buffer


@dataclass(frozen=True)
class StoredFactor:
    lowres: torch.Tensor  # (3, h, w) float32, CPU
    size: tuple[int, int]  # (H, W) of the image it belongs to

    @property
    def nbytes(self) -> int:
        return self.lowres.numel() * self.lowres.element_size()

    def full(self) -> torch.Tensor:
        """x_r at the image's size: (3, H, W) float32 in [-1, 1]."""
        return upsample_factor(self.lowres[None], self.size)[0]


class FactorStoreUnavailable(Exception):
    """The shared store cannot be reached: GET /factor answers 503."""


def new_factor_id() -> str:
    return secrets.token_urlsafe(ID_BYTES)


def open_factor_store(settings, registry=None):
    """The store the settings ask for: Redis when SGZ_REDIS_URL is set, else in-process."""
    if settings.redis_url:
        from .redis_store import RedisFactorStore  # only then is the client imported

        return RedisFactorStore.from_settings(settings, registry)
    return FactorStore(
        settings.factor_store_items,
        settings.factor_store_bytes,
        ttl_s=settings.factor_ttl_s,
        max_map_bytes=settings.factor_map_max_bytes,
    )


class FactorStore:
    backend = "memory"

    def __init__(
        self,
        max_items: int,
        max_bytes: int,
        *,
        ttl_s: float | None = None,
        max_map_bytes: int | None = None,
    ):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_map_bytes = max_bytes if max_map_bytes is None else max_map_bytes
        self._items: OrderedDict[str, tuple[StoredFactor, float]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, lowres: torch.Tensor, size: tuple[int, int]) -> str | None:
        """Keep a map under a new unguessable id and return it; None when it can never fit."""
        entry = StoredFactor(lowres, (size[0], size[1]))
        if self.max_items == 0 or entry.nbytes > min(self.max_bytes, self.max_map_bytes):
            return None
        self._expire()
        while self._items and (
            len(self._items) >= self.max_items or self._bytes + entry.nbytes > self.max_bytes
        ):
            self._drop(next(iter(self._items)))
        factor_id = new_factor_id()
        expires = time.monotonic() + self.ttl_s if self.ttl_s else float("inf")
        self._items[factor_id] = (entry, expires)
        self._bytes += entry.nbytes
        return factor_id

    def get(self, factor_id: str) -> StoredFactor | None:
        self._expire()
        found = self._items.get(factor_id)
        return found[0] if found else None

    def _expire(self) -> None:
        """Drop the maps past their TTL: all at the front, since all live equally long."""
        now = time.monotonic()
        while self._items and next(iter(self._items.values()))[1] <= now:
            self._drop(next(iter(self._items)))

    def _drop(self, factor_id: str) -> None:
        found = self._items.pop(factor_id, None)
        if found is not None:
            self._bytes -= found[0].nbytes

    # The interface routes use, shared with RedisFactorStore.
    async def save(self, lowres: torch.Tensor, size: tuple[int, int]) -> str | None:
        return self.put(lowres, size)

    async def load(self, factor_id: str) -> StoredFactor | None:
        return self.get(factor_id)

    async def status(self) -> dict:
        return {"backend": self.backend, "available": True}

    async def close(self) -> None:
        pass


def render_factor(entry: StoredFactor, fmt: str, full: bool) -> bytes:
    """`png`: the picture of paper Fig. 3 (darker = lower factor), at the image's size when
    `full`, else at EFE's. `npy` (EFE's size only; full size streams, see `npy_strips`): the
    float32 map as (h, w, 3), laid out like the image so that map[y, x] belongs to pixel (x, y)."""
    if fmt == "npy":
        assert not full, "a full-size npy is streamed: npy_strips"
        buf = io.BytesIO()
        np.save(buf, entry.lowres.permute(1, 2, 0).contiguous().numpy())
        return buf.getvalue()
    return encode_image(
        factor_to_picture(entry.full() if full else entry.lowres), None, False, "PNG"
    )


def npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)}
    )
    return buf.getvalue()


def full_npy_length(entry: StoredFactor) -> int:
    height, width = entry.size
    return len(npy_header((height, width, 3))) + height * width * 3 * 4


def npy_strips(entry: StoredFactor) -> Iterator[tuple[int, int]]:
    """Row ranges [y0, y1) of the full-size map, each about STRIP_BYTES as float32."""
    height, width = entry.size
    rows = max(1, STRIP_BYTES // (width * 3 * 4))
    return ((y0, min(y0 + rows, height)) for y0 in range(0, height, rows))


def _source(size_in: int, size_out: int, start: int, stop: int):
    """Bilinear, align_corners=True: for output positions [start, stop), the two input
    positions each mixes and the weight of the second, in float32 as PyTorch computes them."""
    scale = np.float32((size_in - 1) / (size_out - 1) if size_out > 1 else 0.0)
    src = np.arange(start, stop, dtype=np.float32) * scale
    first = np.minimum(src.astype(np.int64), size_in - 1)
    return first, np.minimum(first + 1, size_in - 1), src - first


def full_npy_strip(entry: StoredFactor, y0: int, y1: int) -> bytes:
    """Rows [y0, y1) of `npy` at full size (the header first when y0 == 0): the upsampling of
    `StoredFactor.full` (to float rounding), from only the EFE rows they need. In NumPy, single
    threaded: torch's thread pool is far slower on steps this small (docs/service.md, npy)."""
    height, width = entry.size
    low = entry.lowres.permute(1, 2, 0).numpy()  # (h, w, 3)
    top, below, ty = _source(low.shape[0], height, y0, y1)
    left, right, tx = _source(low.shape[1], width, 0, width)
    r0, r1 = int(top[0]), int(below[-1]) + 1
    rows = low[r0:r1]
    wide = rows[:, left] * (1 - tx)[:, None] + rows[:, right] * tx[:, None]  # x first, as torch
    ty = ty[:, None, None]
    strip = wide[top - r0] * (1 - ty) + wide[below - r0] * ty
    body = np.ascontiguousarray(strip, dtype="<f4").tobytes()
    return (npy_header((height, width, 3)) + body) if y0 == 0 else body
