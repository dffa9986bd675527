"""The SGZ training objective (Sec. 3.4, Eq. 3): a weighted sum of the five losses."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.rie import rie

from . import losses
from .options import option

# Eq. 3 weights. paper: lambda = 1 for every term but lambda_sem = 0.1 (Sec. 4.1);
# code: the published training script's weights (1 / 5 / 10 / 1600 / 0.1).
# uni, spread, smooth: our priors on the factor map's spread over the image
# (losses.factor_uniformity, losses.factor_spread, L_tv on x_r at EFE's resolution beside L_tv's
# own target); level: ours, each image's mean luminance against E (losses.exposure_level). In
# neither set: off.
DEFAULT_WEIGHTS = {
    "paper": {
        "spa": 1.0,
        "rgb": 1.0,
        "bri": 1.0,
        "tv": 1.0,
        "sem": 0.1,
        "uni": 0.0,
        "spread": 0.0,
        "smooth": 0.0,
        "level": 0.0,
    },
    "code": {
        "spa": 1.0,
        "rgb": 5.0,
        "bri": 10.0,
        "tv": 1600.0,
        "sem": 0.1,
        "uni": 0.0,
        "spread": 0.0,
        "smooth": 0.0,
        "level": 0.0,
    },
}

LEVEL_ON = ("image", "mean-map")  # what the "level" term measures (Objective.level_on)
TV_ON = ("efe", "full", "image")  # what L_tv smooths (Objective.tv_on)


@dataclass
class Objective:
    """The loss; `sgz train` has one option per field (training/options.py), `--w-TERM` for
    each weight."""

    variant: str = option(
        "code",
        "the paper's loss forms and weights or the published code's "
        "(the form of L_rgb, L_bri and L_tv)",
        flag="loss",
        choices=tuple(DEFAULT_WEIGHTS),
    )
    weights: dict | None = option(
        None, "per-term weight over the variant's; 0 switches a term off", cli=False
    )
    exposure: float = option(losses.BRI_E, "E of L_bri (Table 3: 0.6)")
    spa_patch: int = option(losses.SPA_PATCH, "pooling of L_spa (Table 3: 4)")
    # larger asks for exposure over a wider area and leaves local contrast to the image
    bri_patch: int = option(
        losses.BRI_PATCH, "patch side of L_bri (Eq. 6: 16; the crop size: one exposure per crop)"
    )
    # ours, for training speed (the paper feeds USS the image as is); every logged run used 128
    sem_size: int | None = option(
        128, "USS sees the enhanced image resized to this longer side (0: as is)"
    )
    sem_batch: int | None = option(
        None, "USS sees only the first K images per batch (default: all)"
    )
    tv_on: str | None = option(
        None,
        "what L_tv smooths: x_r at EFE's resolution, x_r upsampled, "
        "or Y (default: efe for --loss code, image for --loss paper)",
        choices=TV_ON,
    )
    bri_form: str | None = option(
        None,
        "L_bri's distance to E; l3, log: ours, steeper in the "
        "distance (default: l1 for --loss paper, l2 for --loss code)",
        choices=losses.BRI_FORMS,
    )
    level_exposure: float | None = option(
        None, "E of L_level, each image's mean luminance (default: --exposure)"
    )
    # "mean-map" moves the map's level only, leaving its structure to the other terms
    level_on: str = option(
        "image",
        "L_level on Y, or on the input enhanced by x_r's per-image channel means",
        choices=LEVEL_ON,
    )

    def __post_init__(self):
        if self.variant not in DEFAULT_WEIGHTS:
            raise ValueError(f"loss variant must be 'paper' or 'code', got {self.variant!r}")
        self.weights = {**DEFAULT_WEIGHTS[self.variant], **(self.weights or {})}
        self.tv_on = self.tv_on or ("efe" if self.variant == "code" else "image")
        if self.tv_on not in TV_ON:
            raise ValueError(f"tv_on must be 'efe', 'full' or 'image', got {self.tv_on!r}")
        self.bri_form = self.bri_form or ("l2" if self.variant == "code" else "l1")
        if self.level_on not in LEVEL_ON:
            raise ValueError(f"level_on must be one of {LEVEL_ON}, got {self.level_on!r}")
        if self.bri_form not in losses.BRI_FORMS:
            raise ValueError(f"bri_form must be one of {losses.BRI_FORMS}, got {self.bri_form!r}")

    def __call__(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        x_r: torch.Tensor,
        uss=None,
        x_r_efe: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """y: enhanced, x: input, x_r: the factor map RIE used (full size), x_r_efe: the same
        map at EFE's resolution (defaults to x_r, as when training at scale 1)."""
        w, v, terms = self.weights, self.variant, {}
        x_r_efe = x_r if x_r_efe is None else x_r_efe
        if w["spa"]:
            terms["spa"] = losses.spatial_consistency(y, x, self.spa_patch)
        if w["rgb"]:
            terms["rgb"] = losses.colour_constancy(y, v)
        if w["bri"]:
            # l2 pushes a patch in proportion to its distance from E: dark scenes harder than
            # nearly exposed ones (l1 pushes all alike, so a higher E over-brightens those)
            terms["bri"] = losses.brightness(y, self.exposure, self.bri_patch, self.bri_form)
        if w["level"]:
            e = self.exposure if self.level_exposure is None else self.level_exposure
            # on Y a strong level term pushes x_r hardest where Y is mid-grey; on the mean map
            # every pixel of x_r gets the same push (docs/experiments/training-runs.md, 20-22)
            y_level = y
            if self.level_on == "mean-map":
                y_level = rie(x, x_r_efe.mean((2, 3), keepdim=True))
            terms["level"] = losses.exposure_level(y_level, e)
        if w["tv"]:
            # The published code puts TV on x_r, which it trains at full resolution; at a
            # training scale > 1 the map EFE outputs is the analogue ("efe"): its upsampled copy
            # is smooth by construction, so TV on it barely constrains EFE. Paper Eq. 7: on Y.
            target = {"efe": x_r_efe, "full": x_r, "image": y}
            terms["tv"] = losses.total_variation(target[self.tv_on])
        if w["uni"]:
            terms["uni"] = losses.factor_uniformity(x_r_efe)
        if w["smooth"]:
            # x_r's neighbour-scale structure is texture and noise, not illumination
            # (docs/experiments/training-runs.md, finding 10)
            terms["smooth"] = losses.total_variation(x_r_efe)
        if w["spread"]:
            luma = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), x_r_efe.shape[-2:])
            terms["spread"] = losses.factor_spread(x_r_efe, luma)
        if w["sem"]:
            if uss is None:
                raise ValueError("the semantic loss needs a USS network (or --w-sem 0)")
            terms["sem"] = losses.semantic_focal(uss(self._sem_input(y)))
        total = sum(w[k] * t for k, t in terms.items())
        return total, {k: float(t.detach()) for k, t in terms.items()}

    def _sem_input(self, y: torch.Tensor) -> torch.Tensor:
        if self.sem_batch:
            y = y[: self.sem_batch]
        if self.sem_size and max(y.shape[-2:]) > self.sem_size:
            h, w = y.shape[-2:]
            s = self.sem_size / max(h, w)
            y = F.interpolate(
                y,
                size=(max(1, round(h * s)), max(1, round(w * s))),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        return y
