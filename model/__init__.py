"""SGZ low-light enhancement: EFE (factor extraction) + RIE (recurrent enhancement)."""
from .checkpoint import (DEFAULT_CHECKPOINT, Checkpoint, CheckpointError, load_checkpoint,
                         save_checkpoint)
from .efe import EFE
from .enhancer import Enhancer, load_model
from .rie import downscale, rie, upsample_factor

__all__ = ["EFE", "Enhancer", "Checkpoint", "CheckpointError", "DEFAULT_CHECKPOINT",
           "load_model", "load_checkpoint", "save_checkpoint", "rie", "downscale",
           "upsample_factor"]
__version__ = "0.1.0"
