"""Recent factor maps, for `GET /factor/{request_id}`.

Maps are kept at EFE's resolution, as `Enhancer.enhance(return_factor=True)` returns them, and
upsampled only when asked for: with the published scale factor 12 that is 144x less memory
than the full-size map. Bounded by count and by bytes; the oldest go first. Used from the
event loop only, so it needs no lock.
"""
import io
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from model import upsample_factor
from model.imageio import encode_image, factor_to_picture


@dataclass(frozen=True)
class StoredFactor:
    lowres: torch.Tensor    # (3, h, w) float32, CPU
    size: tuple[int, int]   # (H, W) of the image it belongs to

    @property
    def nbytes(self) -> int:
        return self.lowres.numel() * self.lowres.element_size()

    def full(self) -> torch.Tensor:
        """x_r at the image's size: (3, H, W) float32 in [-1, 1]."""
        return upsample_factor(self.lowres[None], self.size)[0]


class FactorStore:
    def __init__(self, max_items: int, max_bytes: int):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, StoredFactor] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, request_id: str, lowres: torch.Tensor, size: tuple[int, int]) -> bool:
        """Keep a map (replacing one with the same id); False when it can never fit."""
        entry = StoredFactor(lowres, tuple(size))
        self._drop(request_id)
        if self.max_items == 0 or entry.nbytes > self.max_bytes:
            return False
        while self._items and (len(self._items) >= self.max_items
                               or self._bytes + entry.nbytes > self.max_bytes):
            self._drop(next(iter(self._items)))
        self._items[request_id] = entry
        self._bytes += entry.nbytes
        return True

    def get(self, request_id: str) -> StoredFactor | None:
        return self._items.get(request_id)

    def _drop(self, request_id: str) -> None:
        entry = self._items.pop(request_id, None)
        if entry is not None:
            self._bytes -= entry.nbytes


def render_factor(entry: StoredFactor, fmt: str) -> bytes:
    """`png`: the picture of paper Fig. 3 (darker = lower factor). `npy`: the float32 map as
    (H, W, 3), laid out like the image so that map[y, x] belongs to pixel (x, y)."""
    x_r = entry.full()
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, x_r.permute(1, 2, 0).contiguous().numpy())
        return buf.getvalue()
    return encode_image(factor_to_picture(x_r), None, False, "PNG")
