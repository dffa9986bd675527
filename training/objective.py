"""The SGZ training objective (Sec. 3.4, Eq. 3): a weighted sum of the five losses."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.rie import rie

from . import losses

# Eq. 3 weights. paper: lambda = 1 for every term but lambda_sem = 0.1 (Sec. 4.1);
# code: the published training script's weights (1 / 5 / 10 / 1600 / 0.1).
# uni, spread, smooth: our priors on the factor map's spread over the image
# (losses.factor_uniformity, losses.factor_spread, L_tv on x_r at EFE's resolution beside L_tv's
# own target); level: ours, each image's mean luminance against E (losses.exposure_level). In
# neither set: off.
DEFAULT_WEIGHTS = {
    "paper": {"spa": 1.0, "rgb": 1.0, "bri": 1.0, "tv": 1.0, "sem": 0.1, "uni": 0.0,
              "spread": 0.0, "smooth": 0.0, "level": 0.0},
    "code": {"spa": 1.0, "rgb": 5.0, "bri": 10.0, "tv": 1600.0, "sem": 0.1, "uni": 0.0,
             "spread": 0.0, "smooth": 0.0, "level": 0.0},
}

LEVEL_ON = ("image", "mean-map")  # what the "level" term measures (Objective.level_on)


@dataclass
class Objective:
    variant: str = "code"           # "paper" or "code": the form of L_rgb, L_bri and L_tv
    weights: dict | None = None     # per-term weight; 0 switches a term off
    exposure: float = losses.BRI_E
    spa_patch: int = losses.SPA_PATCH
    bri_patch: int = losses.BRI_PATCH  # L_bri's patch side; larger asks for exposure over a
                                       # wider area and leaves local contrast to the image
    sem_size: int | None = None     # USS sees the enhanced image resized to this (None: as is)
    sem_batch: int | None = None    # USS sees only the first K images of a batch (None: all)
    tv_on: str | None = None        # "efe": x_r as EFE outputs it, "full": x_r upsampled to the
                                    # image, "image": Y. Default: "efe" (code), "image" (paper)
    bri_form: str | None = None     # L_bri's distance, "l1", "l2", "l3" or "log" (ours).
                                    # Default: "l1" (paper), "l2" (code)
    level_exposure: float | None = None  # E of the "level" term (None: `exposure`)
    level_on: str = "image"         # what the "level" term measures: "image", Y; "mean-map", the
                                    # input enhanced by each channel's mean of x_r (moves the
                                    # map's level only, leaving its structure to the other terms)

    def __post_init__(self):
        if self.variant not in DEFAULT_WEIGHTS:
            raise ValueError(f"loss variant must be 'paper' or 'code', got {self.variant!r}")
        self.weights = {**DEFAULT_WEIGHTS[self.variant], **(self.weights or {})}
        self.tv_on = self.tv_on or ("efe" if self.variant == "code" else "image")
        if self.tv_on not in ("efe", "full", "image"):
            raise ValueError(f"tv_on must be 'efe', 'full' or 'image', got {self.tv_on!r}")
        self.bri_form = self.bri_form or ("l2" if self.variant == "code" else "l1")
        if self.level_on not in LEVEL_ON:
            raise ValueError(f"level_on must be one of {LEVEL_ON}, got {self.level_on!r}")
        if self.bri_form not in losses.BRI_FORMS:
            raise ValueError(f"bri_form must be one of {losses.BRI_FORMS}, got {self.bri_form!r}")

    def __call__(self, y: torch.Tensor, x: torch.Tensor, x_r: torch.Tensor,
                 uss=None, x_r_efe: torch.Tensor | None = None
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
            # on Y a strong level term pushes x_r hardest where Y is mid-grey (finding 20); on
            # the mean map every pixel of x_r gets the same push, which alone did not keep the
            # map's structure either (finding 22: EFE can only set a level through local cues)
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
            # blurring x_r at EFE's resolution after training raised LOL SSIM (model card):
            # its neighbour-scale structure is texture and noise, not illumination
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
            y = F.interpolate(y, size=(max(1, round(h * s)), max(1, round(w * s))),
                              mode="bilinear", align_corners=False, antialias=True)
        return y
