"""The five non-reference losses of SGZ (Zheng & Gupta 2022, Sec. 3.4, Eqs. 3-8).

Y is the enhanced image, I the input, both (N, 3, H, W) in [0, 1]; x_r the factor map.
Where the paper and the published code differ, both forms are here and `variant` picks one:
"paper" follows the equations, "code" the published training script (which produced the
published checkpoint). L_bri's forms are named by their distance, `form` "l1" (paper), "l2"
(code), or ours, "l3" and "log", because training may pair any with either set
(`sgz train --bri-form`).
"""

import math

import torch
import torch.nn.functional as F

SPA_PATCH = 4  # Sec. 3.4 / Table 3: 4x4 pooled regions (A=4 best)
SPA_DIAGONAL = 0.5  # Eq. 4: weight alpha of the 4 diagonal neighbours
BRI_PATCH = 16  # Eq. 6: 16x16 non-overlapping patches
BRI_E = 0.6  # Eq. 6 / Table 3: well-exposedness level E = 0.6 best
CHARBONNIER_EPS = 1e-6  # Eq. 5
BRI_FORMS = ("l1", "l2", "l3", "log")  # L_bri's distances: paper, code, then ours
LOG_OFFSET = 0.1  # ours: L_bri's "log" form measures log(m + 0.1), as log camera curves
# offset black: it keeps the loss and its push (~1/m without it) finite
# on near-black crops (docs/experiments/training-runs.md, finding 21)
FOCAL_BETA = 1.0  # Eq. 8
FOCAL_GAMMA = 2.0  # Eq. 8

# 3x3 kernels taking "centre minus neighbour" for the 8 neighbours, with their Eq. 4 weights.
_NEIGHBOURS = [
    ((1, 0), 1.0),
    ((1, 2), 1.0),
    ((0, 1), 1.0),
    ((2, 1), 1.0),
    ((0, 0), SPA_DIAGONAL),
    ((0, 2), SPA_DIAGONAL),
    ((2, 0), SPA_DIAGONAL),
    ((2, 2), SPA_DIAGONAL),
]


def _neighbour_kernels(device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.zeros(len(_NEIGHBOURS), 1, 3, 3, device=device, dtype=dtype)
    for i, ((r, c), _) in enumerate(_NEIGHBOURS):
        k[i, 0, 1, 1] = 1.0
        k[i, 0, r, c] = -1.0
    w = torch.tensor([w for _, w in _NEIGHBOURS], device=device, dtype=dtype)
    return k, w


def spatial_consistency(y: torch.Tensor, i: torch.Tensor, patch: int = SPA_PATCH) -> torch.Tensor:
    """L_spa, Eq. 4: on 4x4 average-pooled luminance, the squared difference between Y's and
    I's differences to each neighbour; 4 adjacent neighbours weight 1, 4 diagonal weight 0.5.
    Summed over neighbours, averaged over regions (zero padding at borders, as the code)."""
    k, w = _neighbour_kernels(y.device, y.dtype)
    py = F.avg_pool2d(y.mean(1, keepdim=True), patch)
    pi = F.avg_pool2d(i.mean(1, keepdim=True), patch)
    d = (F.conv2d(py, k, padding=1) - F.conv2d(pi, k, padding=1)) ** 2
    return (d * w.view(1, -1, 1, 1)).sum(1).mean()


def colour_constancy(y: torch.Tensor, variant: str = "paper") -> torch.Tensor:
    """L_rgb, Eq. 5: the channel means of Y should agree for (R,G), (R,B), (G,B).

    paper: sum of Charbonnier sqrt(d^2 + eps^2) of the mean differences;
    code:  sqrt of the sum of squared squared-differences (Zero-DCE)."""
    m = y.mean((2, 3))
    r, g, b = m[:, 0], m[:, 1], m[:, 2]
    pairs = [r - g, r - b, g - b]
    if variant == "paper":
        return sum(torch.sqrt(d * d + CHARBONNIER_EPS**2) for d in pairs).mean()
    # clamp: sqrt's gradient at 0 is infinite, and 0 * inf = NaN when the three channel means
    # agree exactly (a grey crop): it stopped a scale-1 training run at step 99
    return torch.sqrt(sum((d * d) ** 2 for d in pairs).clamp_min(1e-30)).mean()


def brightness(
    y: torch.Tensor, e: float = BRI_E, patch: int = BRI_PATCH, form: str = "l1"
) -> torch.Tensor:
    """L_bri, Eq. 6: mean luminance of each 16x16 patch against the level E
    (paper: "l1" distance; code: "l2"; ours: "l3", the cubed distance, and "log", the squared
    distance of log(m + 0.1) from log(E + 0.1)). At E = 0.65 a patch at 0.15 is pushed 5x harder
    than one at 0.55 by "l2", 25x by "l3", 20x by "log"; "l1" pushes them alike."""
    m = F.avg_pool2d(y.mean(1, keepdim=True), patch)
    if form == "log":
        return (((m + LOG_OFFSET).log() - math.log(e + LOG_OFFSET)) ** 2).mean()
    return ((m - e).abs() ** {"l1": 1, "l2": 2, "l3": 3}[form]).mean()


def exposure_level(y: torch.Tensor, e: float = BRI_E) -> torch.Tensor:
    """Ours, not in the paper: the squared distance of each image's mean luminance from E,
    averaged over the batch. It asks every pixel of an image alike (no contrast flattening
    within it) and pushes an image in proportion to how far it is from E, so a nearly exposed
    scene is brightened less than a dark one (L_bri's L1 pushes them equally)."""
    return ((y.mean(dim=(1, 2, 3)) - e) ** 2).mean()


def total_variation(t: torch.Tensor) -> torch.Tensor:
    """L_tv, Eq. 7: mean squared horizontal + vertical differences (the published code's
    normalisation: 2 * (h_tv / count_h + w_tv / count_w) / N)."""
    n, _, h, w = t.shape
    h_tv = ((t[:, :, 1:, :] - t[:, :, :-1, :]) ** 2).sum() / max(1, (h - 1) * w)
    w_tv = ((t[:, :, :, 1:] - t[:, :, :, :-1]) ** 2).sum() / max(1, h * (w - 1))
    return 2 * (h_tv + w_tv) / n


def factor_uniformity(x_r: torch.Tensor) -> torch.Tensor:
    """Not in the paper: the spatial variance of the factor map, per image and channel, averaged.
    A prior towards one curve per image. Unlike L_tv, which sees only neighbour differences
    (tiny on EFE's smooth output), it also sees slow variation across the image, where the
    published checkpoint's maps differ most from ours (docs/experiments/training-runs.md,
    finding 9)."""
    return x_r.flatten(2).var(2, unbiased=False).mean()


def factor_spread(x_r: torch.Tensor, luma: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Not in the paper: the spatial variance of the factor map that the input's luminance does
    not explain (per image and channel, the residual of a least-squares line x_r ~ a + b * luma),
    averaged. x_r: (N, 3, h, w); luma: (N, 1, h, w), the input's luminance at x_r's resolution.

    Unlike factor_uniformity it leaves a map that follows the scene's illumination alone (less
    brightening where the scene is bright) and penalises only what varies with texture and
    noise, which is what separates our maps from the published checkpoint's, whose follow
    luminance (docs/experiments/training-runs.md, finding 10)."""
    x = x_r.flatten(2)
    lum = luma.flatten(2).to(x.dtype)
    xc, lc = x - x.mean(2, keepdim=True), lum - lum.mean(2, keepdim=True)
    var_x, var_l = (xc * xc).mean(2), (lc * lc).mean(2)
    cov = (xc * lc).mean(2)
    return (var_x - cov * cov / (var_l + eps)).clamp_min(0).mean()


def semantic_focal(
    logits: torch.Tensor, beta: float = FOCAL_BETA, gamma: float = FOCAL_GAMMA
) -> torch.Tensor:
    """L_sem, Eq. 8: focal loss -beta (1 - p)^gamma log p, where p is USS's softmax probability
    of its own argmax class at each pixel (no labels: the target is the prediction)."""
    logp = F.log_softmax(logits, 1)
    target = logits.detach().argmax(1, keepdim=True)
    logp_t = logp.gather(1, target)
    return (-beta * (1 - logp_t.exp()) ** gamma * logp_t).mean()
