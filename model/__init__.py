"""SGZ low-light enhancement: EFE (factor extraction) + RIE (recurrent enhancement)."""

from .backends import available_backends
from .checkpoint import (
    DEFAULT_CHECKPOINT,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from .efe import EFE, EFEConfig
from .enhancer import Enhancer, load_model
from .resample import downscale, upsample_factor
from .rie import rie

__all__ = [
    "EFE",
    "EFEConfig",
    "Enhancer",
    "Checkpoint",
    "CheckpointError",
    "DEFAULT_CHECKPOINT",
    "load_model",
    "load_checkpoint",
    "save_checkpoint",
    "available_backends",
    "rie",
    "downscale",
    "upsample_factor",
]
__version__ = "0.1.0"
