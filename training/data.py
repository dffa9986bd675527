"""Training images: a folder of photos, random crops and flips, streamed by a DataLoader."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from model.imageio import IMAGE_SUFFIXES


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"training data folder {folder} does not exist "
            "(set --data; the default is ../shared/data/train)"
        )
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images in {folder}")
    return files


class CropDataset(Dataset):
    """Each item: one image, randomly cropped to `crop` (or resized up when smaller) and
    flipped, as float (3, crop, crop) in [0, 1]. Randomness comes from the seed and the index
    and epoch, so a run is reproducible whatever the number of workers."""

    def __init__(self, folder: str | Path, crop: int, seed: int = 0):
        self.files = list_images(folder)
        self.crop = crop
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        img = Image.open(self.files[index]).convert("RGB")
        w, h = img.size
        if min(w, h) < self.crop:
            s = self.crop / min(w, h)
            img = img.resize(
                (max(self.crop, round(w * s)), max(self.crop, round(h * s))), Image.BILINEAR
            )
            w, h = img.size
        x0 = int(rng.integers(0, w - self.crop + 1))
        y0 = int(rng.integers(0, h - self.crop + 1))
        a = np.asarray(img.crop((x0, y0, x0 + self.crop, y0 + self.crop)), dtype=np.uint8)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        if rng.random() < 0.5:
            a = a[::-1]
        return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255)


def make_loader(
    dataset: CropDataset, batch_size: int, workers: int, seed: int, epoch: int, start_batch: int = 0
) -> DataLoader:
    """The batches of one epoch, in a seeded order, from batch `start_batch` on (for resume)."""
    dataset.epoch = epoch
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(dataset), generator=g).tolist()
    usable = len(order) // batch_size * batch_size  # drop the ragged last batch
    order = order[start_batch * batch_size : usable]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
    )
