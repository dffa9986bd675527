"""Checkpoint files: our own format (with metadata and a content hash) and the published
SGZ / Zero-DCE++ raw state dicts.

Files are always read with `torch.load(weights_only=True)`: only tensors and plain containers
are unpickled, never arbitrary objects.
"""
import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .efe import EFE, FEATURES
from .rie import STEPS

FORMAT = "sgz-serve-checkpoint"
VERSION = 1
ARCH = {"name": "efe", "blocks": 7, "features": FEATURES}
PUBLISHED_SCALE_FACTOR = 12  # the published inference code's EFE downscale factor
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "sgz-default.pt"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says why."""


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    scale_factor: int = PUBLISHED_SCALE_FACTOR
    steps: int = STEPS
    recipe: dict = field(default_factory=dict)
    source: str = "sgz-serve"  # "sgz-serve" or "published" (a raw state dict)
    path: str | None = None

    @property
    def sha256(self) -> str:
        return state_dict_sha256(self.state_dict)


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of the weights' names, shapes and float32 values: independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, efe: EFE, scale_factor: int, steps: int = STEPS,
                    recipe: dict | None = None) -> str:
    """Write our format; returns the content hash. `recipe` must be JSON-serialisable."""
    recipe = dict(recipe or {})
    json.dumps(recipe)  # fail here, not at load time, if it is not plain data
    state_dict = {k: v.detach().cpu().clone() for k, v in efe.state_dict().items()}
    digest = state_dict_sha256(state_dict)
    payload = {
        "format": FORMAT, "version": VERSION, "arch": dict(ARCH),
        "scale_factor": int(scale_factor), "steps": int(steps),
        "recipe": recipe, "sha256": digest, "state_dict": state_dict,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a crash mid-save never leaves a half-written checkpoint
    return digest


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch file "
                              f"(corrupt or truncated?): {e}") from None
    except Exception as e:  # weights_only refuses arbitrary pickled objects
        raise CheckpointError(f"checkpoint {path}: refused to load ({type(e).__name__}): "
                              f"only tensors and plain containers are accepted") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        ckpt = _from_ours(obj, path)
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = Checkpoint(state_dict=dict(obj), source="published", path=str(path),
                          recipe={"note": "published raw state dict"})
    else:
        raise CheckpointError(f"checkpoint {path}: neither an sgz-serve checkpoint nor a raw "
                              f"EFE state dict (keys: {sorted(obj)[:6]})")
    check_state_dict(ckpt.state_dict, path)
    return ckpt


def _from_ours(obj: dict, path: Path) -> Checkpoint:
    if obj.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path}: format version {obj.get('version')!r}, "
                              f"this build reads version {VERSION}")
    if obj.get("arch") != ARCH:
        raise CheckpointError(f"checkpoint {path}: architecture {obj.get('arch')!r}, "
                              f"this build runs {ARCH}")
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {path}: missing state_dict")
    digest = state_dict_sha256(state_dict)
    if digest != obj.get("sha256"):
        raise CheckpointError(f"checkpoint {path}: content hash mismatch (file says "
                              f"{str(obj.get('sha256'))[:12]}, weights hash to {digest[:12]}): "
                              f"the file is corrupt or was edited")
    return Checkpoint(state_dict=state_dict, scale_factor=int(obj["scale_factor"]),
                      steps=int(obj["steps"]), recipe=dict(obj.get("recipe") or {}),
                      source="sgz-serve", path=str(path))


def check_state_dict(state_dict: dict, path) -> None:
    expected = EFE().state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: not an EFE state dict "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    for k, v in expected.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(f"checkpoint {path}: {k} has shape "
                                  f"{tuple(state_dict[k].shape)}, expected {tuple(v.shape)}")
        if not torch.isfinite(state_dict[k]).all():
            raise CheckpointError(f"checkpoint {path}: {k} holds NaN or inf")
