"""Checkpoint files: our own format (with metadata and a content hash) and the published
SGZ / Zero-DCE++ raw state dicts.

Files are always read with `torch.load(weights_only=True)`: only tensors and plain containers
are unpickled, never arbitrary objects.
"""

import hashlib
import json
import pickle
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from .efe import EFE, FEATURES, EFEConfig
from .rie import STEPS

FORMAT = "sgz-serve-checkpoint"
VERSION = 1
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
    efe: EFEConfig | None = None  # None: inferred from the weights (`efe_config`)

    def __post_init__(self):
        if self.efe is None:
            self.efe = efe_config(None, self.state_dict, self.path)

    @cached_property
    def sha256(self) -> str:
        """Computed once: /readyz and the metrics report it on every call."""
        return state_dict_sha256(self.state_dict)

    @property
    def level(self) -> bool:
        """Whether the network has our level gain (model/efe.py): EFE(level=...)."""
        assert self.efe is not None  # set in __post_init__
        return self.efe.level


def efe_config(arch: dict | None, state_dict: dict, path=None) -> EFEConfig:
    """The EFE architecture of a checkpoint, the one place it is decided.

    Our files carry it in "arch" (`EFEConfig.to_dict()`; files from before EFEConfig hold
    {"name", "blocks", "features"} plus "level": True with the level gain, which reads the
    same, a missing "level" being False). A published raw state dict has no "arch": it is
    inferred from the weights, as it always was: the level gain when they hold a "level"
    tensor, the feature count from e_conv1's pointwise output channels. CheckpointError when
    the stored architecture is not one this build runs or disagrees with the weights."""
    if arch is None:
        pw = state_dict.get("e_conv1.point_conv.weight")
        features = int(pw.shape[0]) if isinstance(pw, torch.Tensor) and pw.dim() else FEATURES
        return EFEConfig(features=features, level="level" in state_dict)
    try:
        config = EFEConfig.from_dict(arch)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path}: architecture {arch!r} is not one this build runs ({e})"
        ) from None
    if config.level != ("level" in state_dict):
        raise CheckpointError(
            f"checkpoint {path}: architecture {arch!r} does not match its "
            f"weights (level gain "
            f"{'present' if 'level' in state_dict else 'absent'})"
        )
    return config


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of the weights' names, shapes and float32 values: independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | Path, efe: EFE, scale_factor: int, steps: int = STEPS, recipe: dict | None = None
) -> str:
    """Write our format; returns the content hash. `recipe` must be JSON-serialisable."""
    recipe = dict(recipe or {})
    recipe = json.loads(json.dumps(recipe))  # plain data only: str subclasses would not unpickle
    # plain layout whatever the module's (training keeps EFE channels-last)
    state_dict = {
        k: v.detach().cpu().clone(memory_format=torch.contiguous_format)
        for k, v in efe.state_dict().items()
    }
    digest = state_dict_sha256(state_dict)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": efe.config.to_dict(),
        "scale_factor": int(scale_factor),
        "steps": int(steps),
        "recipe": recipe,
        "sha256": digest,
        "state_dict": state_dict,
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
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: empty file")
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        ckpt = _from_ours(obj, path)
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        ckpt = Checkpoint(
            state_dict=dict(obj),
            source="published",
            path=str(path),
            recipe={"note": "published raw state dict"},
        )
    else:
        raise CheckpointError(
            f"checkpoint {path}: neither an sgz-serve checkpoint nor a raw "
            f"EFE state dict (keys: {[str(k) for k in obj][:6]})"
        )
    assert ckpt.efe is not None  # set in Checkpoint.__post_init__
    check_state_dict(ckpt.state_dict, path, ckpt.efe)
    return ckpt


def _torch_load(path: Path):
    """torch.load with weights_only, its many failure modes turned into one clear message."""
    try:
        with warnings.catch_warnings():
            # a plain pickle's protocol warning (several lines) would precede our one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:  # weights_only met a Python object it will not construct
            raise CheckpointError(
                f"checkpoint {path}: refused to unpickle {refused.group(1)}: "
                f"only tensors and plain containers are loaded, never "
                f"arbitrary Python objects"
            ) from None
        raise CheckpointError(
            f"checkpoint {path}: not a PyTorch checkpoint (a pickle torch.load cannot read)"
        ) from None
    except Exception as e:  # zip, storage and pickle-opcode errors from a damaged file
        first_line = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(
            f"checkpoint {path}: not a readable PyTorch file (corrupt, "
            f"truncated, or not a checkpoint): {type(e).__name__}: "
            f"{first_line}"
        ) from None


def _from_ours(obj: dict, path: Path) -> Checkpoint:
    if obj.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {obj.get('version')!r}, "
            f"this build reads version {VERSION}"
        )
    state_dict = obj.get("state_dict")
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise CheckpointError(f"checkpoint {path}: missing state_dict, or it holds non-tensors")
    config = efe_config(obj.get("arch") or {}, state_dict, path)
    for name in ("scale_factor", "steps"):
        value = obj.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(
                f"checkpoint {path}: {name} must be a positive integer, found {value!r}"
            )
    recipe = obj.get("recipe") or {}
    if not isinstance(recipe, dict):
        raise CheckpointError(
            f"checkpoint {path}: recipe must be a dict, found {type(recipe).__name__}"
        )
    digest = state_dict_sha256(state_dict)
    if digest != obj.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path}: content hash mismatch (file says "
            f"{str(obj.get('sha256'))[:12]}, weights hash to {digest[:12]}): "
            f"the file is corrupt or was edited"
        )
    return Checkpoint(
        state_dict=state_dict,
        scale_factor=obj["scale_factor"],
        steps=obj["steps"],
        recipe=dict(recipe),
        source="sgz-serve",
        path=str(path),
        efe=config,
    )


def check_state_dict(state_dict: dict, path, config: EFEConfig) -> None:
    expected = EFE.from_config(config).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: not an EFE state dict "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    for k, v in expected.items():
        if not isinstance(state_dict[k], torch.Tensor):
            raise CheckpointError(
                f"checkpoint {path}: {k} is a {type(state_dict[k]).__name__}, not a tensor"
            )
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint {path}: {k} has shape "
                f"{tuple(state_dict[k].shape)}, expected {tuple(v.shape)}"
            )
        if not torch.isfinite(state_dict[k]).all():
            raise CheckpointError(f"checkpoint {path}: {k} holds NaN or inf")
