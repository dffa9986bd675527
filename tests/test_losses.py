"""Each SGZ loss against a value worked out by hand on a tiny tensor."""

import math

import pytest
import torch

from training import losses
from training.objective import Objective


def test_spatial_consistency_constant_image_against_black_input():
    # pooled Y = 0.5 in one region, zero-padded neighbours: each of the 8 differences is 0.5,
    # squared 0.25; weights 4 x 1 + 4 x 0.5 -> 6 x 0.25 = 1.5
    y = torch.full((1, 3, 4, 4), 0.5)
    assert losses.spatial_consistency(y, torch.zeros_like(y)).item() == pytest.approx(1.5)


def test_spatial_consistency_one_bright_region():
    # 2x2 regions (patch 1), Y = [[1,0],[0,0]], I = 0. Region sums of weighted squared
    # differences: (0,0) 4*1 + 4*0.5 = 6, (0,1) 1, (1,0) 1, (1,1) diagonal 0.5 -> mean 8.5/4
    y = torch.zeros(1, 3, 2, 2)
    y[:, :, 0, 0] = 1.0
    loss = losses.spatial_consistency(y, torch.zeros_like(y), patch=1)
    assert loss.item() == pytest.approx(2.125)


def test_spatial_consistency_is_zero_when_structure_is_kept():
    i = torch.rand(1, 3, 16, 16)
    assert losses.spatial_consistency(i, i).item() == 0.0


def _channels(r, g, b, size=4):
    return torch.tensor([r, g, b]).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_colour_constancy_paper_charbonnier():
    y = _channels(0.2, 0.4, 0.8)  # |R-G| + |R-B| + |G-B| = 0.2 + 0.6 + 0.4
    assert losses.colour_constancy(y, "paper").item() == pytest.approx(1.2, abs=1e-5)


def test_colour_constancy_code_form():
    y = _channels(0.2, 0.4, 0.8)  # sqrt(0.04^2 + 0.36^2 + 0.16^2)
    assert losses.colour_constancy(y, "code").item() == pytest.approx(math.sqrt(0.1568), rel=1e-5)


def test_colour_constancy_code_form_has_a_gradient_on_grey_images():
    y = torch.full((2, 3, 4, 4), 0.3, requires_grad=True)  # equal channel means: d = 0
    losses.colour_constancy(y, "code").backward()
    assert torch.isfinite(y.grad).all()


def test_brightness_paper_l1_and_code_l2():
    y = torch.full((2, 3, 32, 32), 0.3)
    assert losses.brightness(y, form="l1").item() == pytest.approx(0.3)
    assert losses.brightness(y, form="l2").item() == pytest.approx(0.09)
    # ours: the cubed distance, and log(m + 0.1) against log(E + 0.1): ln(0.4 / 0.7)^2
    assert losses.brightness(y, form="l3").item() == pytest.approx(0.027)
    assert losses.brightness(y, form="log").item() == pytest.approx(math.log(0.4 / 0.7) ** 2)
    assert losses.brightness(torch.zeros(1, 3, 16, 16), 0.6, form="log").item() == pytest.approx(
        math.log(0.1 / 0.7) ** 2
    )  # black is finite: 0.1 offset
    # `sgz train --bri-form` picks the distance whatever the --loss set: 0.3 and 0.3^2 from E
    only_bri = {"spa": 0, "rgb": 0, "tv": 0, "sem": 0}
    for variant, form, expected in (
        ("paper", None, 0.3),
        ("paper", "l2", 0.09),
        ("code", None, 0.09),
        ("code", "l1", 0.3),
    ):
        objective = Objective(variant=variant, weights={**only_bri, "bri": 1.0}, bri_form=form)
        assert objective(y, y, y)[0].item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="bri_form"):
        Objective(bri_form="l4")


def test_brightness_patch_size():
    # left half black, right half white: every 16x16 patch is 0 or 1 away from E = 0.5 ...
    y = torch.zeros(1, 3, 32, 32)
    y[..., 16:] = 1.0
    assert losses.brightness(y, 0.5, 16).item() == pytest.approx(0.5)
    # ... but the one 32x32 patch is exactly at E
    assert losses.brightness(y, 0.5, 32).item() == pytest.approx(0.0)
    only_bri = {"spa": 0, "rgb": 0, "tv": 0, "sem": 0}
    for patch, expected in ((16, 0.5), (32, 0.0)):  # `sgz train --bri-patch` reaches the loss
        objective = Objective(variant="paper", weights=only_bri, exposure=0.5, bri_patch=patch)
        assert objective(y, y, y)[0].item() == pytest.approx(expected)


def test_exposure_level_by_hand():
    # image 0: half black, half white (mean 0.5, at E: no loss however uneven); image 1: 0.2
    y = torch.zeros(2, 3, 8, 8)
    y[0, ..., 4:] = 1.0
    y[1] = 0.2
    assert losses.exposure_level(y, 0.5).item() == pytest.approx((0.0 + 0.3**2) / 2)
    only_level = {"spa": 0, "rgb": 0, "bri": 0, "tv": 0, "sem": 0, "level": 2.0}
    objective = Objective(variant="paper", weights=only_level, exposure=0.7, level_exposure=0.5)
    assert objective(y, y, y)[0].item() == pytest.approx(2.0 * 0.045)
    assert Objective(variant="paper", weights=only_level, exposure=0.5)(y, y, y)[
        0
    ].item() == pytest.approx(2.0 * 0.045)  # E defaults to L_bri's
    no_level = {**only_level, "level": 0.0, "tv": 1.0}
    assert list(Objective(variant="paper", weights=no_level)(y, y, y)[1]) == ["tv"]  # off at 0
    assert Objective(variant="paper").weights["level"] == 0  # and by default


def test_exposure_level_on_the_mean_map_moves_only_the_level():
    # input 0.5 everywhere, map 0 on the left half and -1 on the right: its mean is -0.5, and
    # the level term sees the input enhanced by that mean, whatever Y is
    x = torch.full((1, 3, 4, 4), 0.5)
    x_r = torch.zeros(1, 3, 4, 4)
    x_r[..., 2:] = -1.0
    x_r.requires_grad_(True)
    level = 0.5
    for _ in range(8):  # Eq. 1, eight steps, with x_r = -0.5
        level = level - 0.5 * (level * level - level)
    only_level = {"spa": 0, "rgb": 0, "bri": 0, "tv": 0, "sem": 0, "level": 1.0}
    objective = Objective(variant="paper", weights=only_level, exposure=0.6, level_on="mean-map")
    loss = objective(torch.zeros_like(x), x, x_r, x_r_efe=x_r)[0]
    assert loss.item() == pytest.approx((level - 0.6) ** 2)
    loss.backward()
    assert x_r.grad.abs().min() > 0 and torch.allclose(x_r.grad, x_r.grad.flatten()[0])
    with pytest.raises(ValueError, match="level_on"):
        Objective(level_on="mean")


def test_total_variation_by_hand():
    t = torch.tensor([[0.0, 1.0], [2.0, 3.0]]).view(1, 1, 2, 2)
    # vertical: (2-0)^2 + (3-1)^2 = 8 over 2 pairs; horizontal 1 + 1 = 2 over 2 -> 2 * (4 + 1)
    assert losses.total_variation(t).item() == pytest.approx(10.0)


def test_semantic_focal_by_hand():
    logits = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)  # p = (0.25, 0.75)
    expected = -((1 - 0.75) ** 2) * math.log(0.75)
    assert losses.semantic_focal(logits).item() == pytest.approx(expected, rel=1e-5)


def test_factor_uniformity_by_hand():
    x_r = torch.full((2, 3, 4, 4), -0.3)
    assert losses.factor_uniformity(x_r).item() == pytest.approx(0.0)
    x_r[0, 0, :, :2] = 0.7  # one map of six half -0.3, half 0.7: variance 0.25
    assert losses.factor_uniformity(x_r).item() == pytest.approx(0.25 / 6)
    # a constant offset between channels is a colour choice, not a spatial one
    assert losses.factor_uniformity(
        x_r + torch.tensor([0.1, 0.0, -0.1]).view(1, 3, 1, 1)
    ).item() == pytest.approx(0.25 / 6)


def test_factor_spread_by_hand():
    luma = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2)
    # a map that is a line in luminance costs nothing, whatever its slope
    follows = torch.stack([0.2 - 0.5 * luma[0, 0], -0.3 + 0 * luma[0, 0], 0.1 * luma[0, 0]])[None]
    assert losses.factor_spread(follows, luma).item() == pytest.approx(0.0, abs=1e-6)
    # x = [0, 1, 1, 1]: var 0.1875, cov with luma 0.125, var(luma) 0.25 -> 0.1875 - 0.0625
    x_r = torch.tensor([0.0, 1.0, 1.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert losses.factor_spread(x_r, luma).item() == pytest.approx(0.125, rel=1e-4)
    # under uniform luminance nothing is explained: the plain spatial variance
    flat = torch.full((1, 1, 2, 2), 0.3)
    assert losses.factor_spread(x_r, flat).item() == pytest.approx(
        losses.factor_uniformity(x_r).item(), rel=1e-4
    )


def test_factor_priors_reach_the_objective():
    """--w-uni, --w-spread and --w-smooth score x_r at EFE's resolution; spread against the
    input's luminance pooled to that resolution."""
    x = torch.zeros(1, 3, 4, 4)
    x[..., 2:, :] = 0.5  # luminance: two rows dark, two bright
    x_r_efe = torch.tensor([0.0, 1.0]).view(1, 1, 2, 1).expand(1, 3, 2, 2)  # follows it
    # smooth: 3 channels x 2 columns x 1^2 over 2 vertical pairs, times 2 (Eq. 7 as the code) = 6
    y = x_r = torch.zeros(1, 3, 4, 4)
    off = {"spa": 0, "rgb": 0, "bri": 0, "tv": 0, "sem": 0}
    for term, expected in (("uni", 0.25), ("spread", 0.0), ("smooth", 6.0)):
        objective = Objective(variant="paper", weights={**off, term: 1.0})
        loss, terms = objective(y, x, x_r, None, x_r_efe)
        assert set(terms) == {term}
        assert loss.item() == pytest.approx(expected, abs=1e-5)
