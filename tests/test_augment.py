"""Batched augmentation against torchvision's per-image functions and the PIL path."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from scipy import stats
from skimage import data as skdata
from torchvision.transforms import functional as TF

from pirl import augment as A
from pirl.jigsaw import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    JigsawGeometry,
    PirlTransform,
    RandomPhotometric,
    cut_patches,
    photometric,
)


def photo_views(n: int, size: int, seed: int) -> torch.Tensor:
    """n uint8 crops of real photos, plus a gray view and a saturated one (hue edge cases)."""
    rng = np.random.default_rng(seed)
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]
    views = []
    for i in range(n):
        img = photos[i % len(photos)]
        y, x = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        views.append(torch.from_numpy(img[y : y + size, x : x + size]).permute(2, 0, 1))
    out = torch.stack(views)
    out[0] = out[0, :1]  # gray: max == min everywhere
    out[1, :, :, : size // 2] = torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1)
    return out


def reference(view: torch.Tensor, p: A.PhotometricParams, i: int) -> torch.Tensor:
    """One view through torchvision's functional ops in the drawn order (the published recipe)."""
    x = view.float() / 255
    ops = (
        lambda t: TF.adjust_brightness(t, float(p.brightness[i])),
        lambda t: TF.adjust_contrast(t, float(p.contrast[i])),
        lambda t: TF.adjust_saturation(t, float(p.saturation[i])),
        lambda t: TF.adjust_hue(t, float(p.hue[i])),
    )
    for k in p.order[i].tolist():
        x = ops[k](x)
    if p.photo[i]:
        x = photometric_reference(x, int(p.bits[i]), float(p.sharpness[i]), int(p.threshold[i]))
    if p.gray[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.flip[i]:
        x = TF.hflip(x)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def photometric_reference(x: torch.Tensor, bits: int, factor: float, s: int) -> torch.Tensor:
    """VISSL's four ops by torchvision's functional ones on one float view in [0, 1]: posterize
    of the 8-bit pixel floor(255 x) (PIL truncates), solarize at s / 255 (both less the slack
    that keeps float noise on 8-bit levels from moving a level)."""
    pixels = (x * 255 + A.LEVEL_SLACK).floor().to(torch.uint8)
    x = TF.adjust_sharpness(TF.posterize(pixels, bits).float() / 255, factor)
    if s <= 255:  # TF refuses thresholds above its bound; s = 256 inverts nothing
        x = TF.solarize(x, (s - A.LEVEL_SLACK) / 255)
    return TF.autocontrast(x)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue", "sharpness"])
def test_each_op_equals_torchvision_per_view(name: str) -> None:
    x = photo_views(12, 24, seed=0).float() / 255
    g = torch.Generator().manual_seed(1)
    if name == "hue":
        factor = torch.empty(12).uniform_(-0.5, 0.5, generator=g)
        factor[:3] = torch.tensor([0.5, -0.5, 0.0])
    else:
        factor = torch.empty(12).uniform_(0.0, 2.0, generator=g)
    ours = getattr(A, f"adjust_{name}")(x.clone(), factor)
    tv = getattr(TF, f"adjust_{name}")
    want = torch.stack([tv(x[i], float(factor[i])) for i in range(12)])
    torch.testing.assert_close(ours, want, rtol=0, atol=2e-6)


def with_constant_channel(views: torch.Tensor) -> torch.Tensor:
    """views with channel 2 of view 2 flat (autocontrast leaves it) and view 3 flat throughout."""
    out = views.clone()
    out[2, 2] = 77
    out[3] = 200
    return out


def test_posterize_and_solarize_act_on_the_8bit_pixel_as_pil_and_torchvision() -> None:
    """On 8-bit levels, with float noise below them as jitter would leave, both equal PIL's
    ops on the uint8 image; on values between levels, TF's on the truncated pixel (posterize)
    and at s / 255 (solarize). Every bit depth 4..8 and thresholds 0, 1, 255, 256 included."""
    u8 = photo_views(15, 20, seed=12)
    noisy = u8.float() / 255 * (1 - 2**-22) * 255  # a few ulps below the level
    scaled = u8.float() * torch.empty(15, 1, 1, 1).uniform_(
        0.3, 1, generator=torch.Generator().manual_seed(19)
    )
    bits = torch.arange(15) % 5 + 4
    thresholds = torch.tensor([0, 1, 255, 256, 128, 17, 200, 90, 64, 33, 150, 250, 3, 99, 180])
    post = A.posterize(noisy.clone(), bits)
    sol = A.solarize(noisy.clone(), thresholds)
    for i in range(15):
        img = TF.to_pil_image(u8[i])
        want = TF.pil_to_tensor(ImageOps.posterize(img, int(bits[i]))).float()
        assert torch.equal(post[i], want)
        want = TF.pil_to_tensor(ImageOps.solarize(img, int(thresholds[i]))).float()
        torch.testing.assert_close(sol[i], want, rtol=0, atol=1e-4)
    post = A.posterize(scaled.clone(), bits)
    sol = A.solarize(scaled.clone(), thresholds)
    for i in range(15):
        pixels = (scaled[i] + A.LEVEL_SLACK).floor().to(torch.uint8)
        assert torch.equal(post[i], TF.posterize(pixels, int(bits[i])).float())
        s = int(thresholds[i])
        want = (
            TF.solarize(scaled[i] / 255, (s - A.LEVEL_SLACK) / 255) if s < 256 else scaled[i] / 255
        )
        torch.testing.assert_close(sol[i] / 255, want, rtol=0, atol=1e-6)


def test_sharpness_and_autocontrast_equal_torchvision_on_both_scales() -> None:
    """In [0, 1] and in 8-bit levels (where the random photometric ops run them), against TF
    on [0, 1]: constant channels kept by autocontrast, views of 2 px left by sharpness."""
    x = with_constant_channel(photo_views(10, 16, seed=13)).float() / 255
    factor = torch.empty(10).uniform_(0.1, 1.9, generator=torch.Generator().manual_seed(14))
    want = torch.stack([TF.autocontrast(v) for v in x])
    torch.testing.assert_close(A.autocontrast(x.clone()), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(A.autocontrast(x * 255, 255), want, rtol=0, atol=1e-6)
    assert torch.equal(want[3], x[3]) and torch.equal(want[2, 2], x[2, 2])
    levels = torch.arange(256.0).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)  # constant views
    assert torch.equal(A.autocontrast(levels.clone(), 255), levels / 255)  # as ToTensor
    want = torch.stack([TF.adjust_sharpness(v, float(f)) for v, f in zip(x, factor, strict=True)])
    got = A.adjust_sharpness(x * 255, factor, 255) / 255
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    thin = x[:, :, :2, :9]
    assert torch.equal(A.adjust_sharpness(thin.clone(), factor), thin)


def test_random_photometric_agrees_with_pils_ops_on_the_same_8bit_views() -> None:
    """The four ops (VISSL's PIL ones) and the batched ones on the same uint8 views: PIL rounds
    its blur to 8 bits and truncates its sharpness blend and its autocontrast table; ours keep
    floats, so they differ by about a level, and at the rare pixel that this moves across the
    solarize threshold by up to 255. Parameters shuffled across views cost ~50 levels."""
    views = with_constant_channel(photo_views(60, 24, seed=5))
    p = A.draw_params(60, generator=torch.Generator().manual_seed(6))

    def diff(sharpness: torch.Tensor) -> torch.Tensor:
        ours = A.random_photometric(views.float() / 255, p.bits, sharpness, p.threshold)
        args = zip(views, p.bits.tolist(), sharpness.tolist(), p.threshold.tolist(), strict=True)
        pil = [RandomPhotometric.apply(TF.to_pil_image(v), b, f, s) for v, b, f, s in args]
        return (ours * 255 - torch.stack([TF.pil_to_tensor(im) for im in pil])).abs()

    drawn = diff(p.sharpness)
    assert drawn.mean() < 2.0 and torch.quantile(drawn.flatten(), 0.99) <= 10.0
    unsharpened = diff(torch.ones(60))  # only PIL's truncating autocontrast table is left
    assert unsharpened.max() <= 1.0 + 1e-4 and unsharpened.mean() < 0.5


def test_grayscale_equals_torchvision() -> None:
    x = photo_views(4, 16, seed=2).float() / 255
    want = torch.stack([TF.rgb_to_grayscale(v) for v in x])
    torch.testing.assert_close(A.grayscale(x), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grouped", [True, False])
def test_photometric_with_drawn_params_equals_torchvision_composition(grouped: bool) -> None:
    """Every view with its own order, factors, grayscale and flip, as the published recipe;
    both schedules (grouped by op sequence on CPU, positional on GPU)."""
    views = photo_views(60, 20, seed=3)
    p = A.draw_params(60, generator=torch.Generator().manual_seed(4))
    assert p.gray.any() and not p.gray.all() and p.flip.any() and not p.flip.all()
    assert p.photo.any() and not p.photo.all() and set(p.bits[p.photo].tolist()) == {4, 5, 6, 7, 8}
    want = torch.stack([reference(views[i], p, i) for i in range(60)])
    got = A.photometric(views, p, grouped=grouped)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_fixed_params_agree_with_the_pil_path_pixelwise() -> None:
    """Same draws applied by the PIL path's own ops on uint8 images (which round to 8 bits
    after every op, truncating, and quantise hue to 1/256 turn) differ only by that rounding.
    Jitter, grayscale and flip here; the random photometric ops are compared on the same
    8-bit input above: after the jitter, PIL's pixels sit ~1 level below the float's
    truncation, and posterize turns a pixel that this moves across a bin edge into a whole
    bin (up to 16 levels), solarize into an inverted pixel."""
    views = photo_views(40, 24, seed=5)
    p = A.draw_params(40, generator=torch.Generator().manual_seed(6))
    p.photo[:] = False
    ours = A.photometric(views, p)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    diffs = []
    for i in range(40):
        img = TF.to_pil_image(views[i])
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        factors = (p.brightness[i], p.contrast[i], p.saturation[i], p.hue[i])
        for k in p.order[i].tolist():
            img = ops[k](img, float(factors[k]))
        if p.gray[i]:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p.flip[i]:
            img = TF.hflip(img)
        pil = TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)
        diffs.append(((ours[i] - pil) * std[0] * 255).abs())
    diff = torch.stack(diffs)
    # In 8-bit levels: PIL truncates after each of the four ops (about -0.4 level each); its
    # hue quantisation (up to ~6 levels on saturated colours) is then amplified by contrast
    # and saturation factors up to 1.4. A wrong factor or op order costs tens of levels.
    assert diff.mean() < 2.5, diff.mean()
    assert torch.quantile(diff.flatten(), 0.99) <= 10.0, torch.quantile(diff.flatten(), 0.99)


def test_params_follow_torchvision_distributions() -> None:
    n = 24_000
    p = A.draw_params(n, generator=torch.Generator().manual_seed(7))
    for f, lo, hi in (
        (p.brightness, 0.6, 1.4),
        (p.contrast, 0.6, 1.4),
        (p.saturation, 0.6, 1.4),
        (p.hue, -0.2, 0.2),
    ):
        assert lo <= f.min() and f.max() <= hi
        assert stats.kstest(f.numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    # The op order: each of the 4! sequences equally likely (torchvision's randperm(4)).
    codes = (p.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    perms = [
        sum(d * 4 ** (3 - j) for j, d in enumerate(q)) for q in itertools.permutations(range(4))
    ]
    assert counts.sum() == counts[perms].sum()
    assert stats.chisquare(counts[perms].numpy()).pvalue > 1e-3
    for flags, prob in ((p.gray, 0.2), (p.flip, 0.5)):
        sd = math.sqrt(prob * (1 - prob) / n)
        assert abs(flags.float().mean().item() - prob) < 4 * sd


def test_photometric_draws_follow_vissls_distributions_in_both_paths() -> None:
    """ImgPilRandomPhotometric: applied with p = 0.66; bits randint(4, 9), threshold
    randint(0, 257) (both ends drawn), sharpness uniform(0.1, 1.9); batched and PIL draws."""
    n = 12_000
    p = A.draw_params(n, generator=torch.Generator().manual_seed(15))
    torch.manual_seed(16)
    pil = [RandomPhotometric().draw() for _ in range(n)]
    drawn = torch.tensor([d for d in pil if d is not None], dtype=torch.float64)
    for applied, bits, sharpness, threshold in (
        (p.photo, p.bits[p.photo], p.sharpness[p.photo], p.threshold[p.photo]),
        (torch.tensor([d is not None for d in pil]), *drawn.T),
    ):
        sd = math.sqrt(0.66 * 0.34 / n)
        assert abs(applied.double().mean().item() - 0.66) < 4 * sd
        for values, lo, hi in ((bits, 4, 8), (threshold, 0, 256)):
            counts = torch.bincount(values.long() - lo)
            assert len(counts) == hi - lo + 1 and counts.min() > 0
            assert stats.chisquare(counts.numpy()).pvalue > 1e-3
        assert 0.1 <= sharpness.min() and sharpness.max() < 1.9
        assert stats.kstest(sharpness.numpy(), stats.uniform(0.1, 1.8).cdf).pvalue > 1e-3


def test_pil_path_runs_vissls_photometric_ops_after_the_colour_jitter() -> None:
    """The PIRL config's order, and RandomPhotometric.apply against torchvision's uint8 ops:
    posterize, solarize and autocontrast within autocontrast's truncation (1 level); the
    sharpness factor on views whose corners span 0..255 (autocontrast then changes nothing)."""
    kinds = [type(t).__name__ for t in photometric().transforms]
    assert kinds == [
        "ColorJitter",
        "RandomPhotometric",
        "RandomGrayscale",
        "RandomHorizontalFlip",
        "ToTensor",
        "Normalize",
    ]
    assert photometric().transforms[1].p == 0.66
    views = photo_views(20, 24, seed=17)
    views[:, :, 0, 0], views[:, :, -1, -1] = 0, 255
    g = torch.Generator().manual_seed(18)
    for i, v in enumerate(views):
        img, bits = TF.to_pil_image(v), 4 + i % 5
        s, f = int(torch.randint(0, 256, (), generator=g)), 0.1 + 1.8 * i / 19
        got = TF.pil_to_tensor(RandomPhotometric.apply(img, bits, 1.0, s)).int()
        want = TF.autocontrast(TF.solarize(TF.posterize(v, bits), s)).int()
        assert (got - want).abs().max() <= 1
        got = TF.pil_to_tensor(RandomPhotometric.apply(img, 8, f, 256)).int()
        assert (got - TF.adjust_sharpness(v, f).int()).abs().max() <= 1


def test_output_distribution_matches_the_pil_path() -> None:
    """A flat colour through both paths many times: every op changes it (contrast and
    saturation move it toward its luma), so the output colour's law tests the whole recipe."""
    n, colour = 1500, (180, 90, 40)
    flat = Image.fromarray(np.tile(np.array(colour, np.uint8), (4, 4, 1)))
    torch.manual_seed(8)
    pil_tf = photometric()
    pil = torch.stack([pil_tf(flat)[:, 0, 0] for _ in range(n)])
    views = torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1).expand(n, 3, 4, 4)
    ours = A.photometric(views, A.draw_params(n, generator=torch.Generator().manual_seed(9)))
    for c in range(3):
        assert stats.ks_2samp(pil[:, c].numpy(), ours[:, c, 0, 0].numpy()).pvalue > 1e-3


def test_cut_jigsaw_both_kernels_equal_the_per_sample_cut() -> None:
    geo = JigsawGeometry.for_image_size(64)
    g = torch.Generator().manual_seed(10)
    src = torch.randint(0, 256, (5, 3, geo.source_size, geo.source_size), dtype=torch.uint8)
    offsets, perm = A.jigsaw_draw(5, geo, g)
    assert offsets.min() >= 0 and offsets.max() == geo.cell - geo.patch_size - 1
    want = torch.stack([cut_patches(src[b], geo, offsets[b], perm[b]) for b in range(5)])
    assert torch.equal(A.cut_jigsaw(src, geo, offsets, perm), want)
    off = offsets.gather(1, perm.unsqueeze(2).expand(-1, -1, 2))
    y0 = (perm // 3) * geo.cell + off[..., 0]
    x0 = (perm % 3) * geo.cell + off[..., 1]
    assert torch.equal(A._cut_by_gather(src, geo.patch_size, y0, x0), want)
    assert all(sorted(q.tolist()) == list(range(9)) for q in perm)


def test_batch_augment_patches_are_independent_and_seeded() -> None:
    geo = JigsawGeometry.for_image_size(32)
    crop = A.CropTransform(geo)
    flat = Image.fromarray(np.tile(np.array([180, 90, 40], np.uint8), (48, 48, 1)))
    torch.manual_seed(0)
    pairs = [crop(flat) for _ in range(300)]
    images = torch.stack([a for a, _ in pairs])
    sources = torch.stack([b for _, b in pairs])
    assert images.dtype == sources.dtype == torch.uint8
    assert sources.shape[1:] == (3, geo.source_size, geo.source_size)
    aug = A.BatchAugment(geo)
    img, patches, perm = aug(images, sources, torch.Generator().manual_seed(11))
    assert img.shape == (300, 3, 32, 32) and patches.shape[:2] == (300, 9)
    again = aug(images, sources, torch.Generator().manual_seed(11))
    assert torch.equal(img, again[0]) and torch.equal(patches, again[1])
    colour = patches.mean(dim=(3, 4))  # (300, 9, 3): one flat colour per patch
    assert all(len({tuple(c) for c in s.round(decimals=4).tolist()}) == 9 for s in colour[:20])
    # Independent draws: across samples, patch 0's colour says nothing about patch 1's.
    for a, b in ((0, 1), (4, 8)):
        r = np.corrcoef(colour[:, a, 0].numpy(), colour[:, b, 0].numpy())[0, 1]
        assert abs(r) < 4 / math.sqrt(300), r
    assert abs(np.corrcoef(colour[:, 0, 0].numpy(), img.mean(dim=(2, 3))[:, 0].numpy())[0, 1]) < 0.2


@pytest.mark.parametrize("path", ["batched", "pil"])
def test_patch_augment_modes_share_or_skip_the_patches_draws(path: str) -> None:
    """On a flat-colour image every patch of one image has one colour after augmentation: nine
    different colours when each patch draws its own, one colour (different from the image's
    view) when the nine share a draw, and the source's own colour, normalised, with none."""
    geo = JigsawGeometry.for_image_size(32)
    flat = Image.fromarray(np.tile(np.array([180, 90, 40], np.uint8), (48, 48, 1)))
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    source_colour = (torch.tensor([180, 90, 40]) / 255 - mean) / std
    spec = A.PhotometricSpec(hue=0.2, photometric=0.0)
    torch.manual_seed(0)
    crops = [A.CropTransform(geo)(flat) for _ in range(8)]
    images, sources = torch.stack([a for a, _ in crops]), torch.stack([b for _, b in crops])
    for mode, distinct in (("independent", 9), ("shared", 1), ("none", 1)):
        if path == "batched":
            aug = A.BatchAugment(geo, spec, mode)
            _, patches, _ = aug(images, sources, torch.Generator().manual_seed(3))
        else:
            torch.manual_seed(3)
            t = PirlTransform(geo, patch_augment=mode, hue=0.2, photometric_p=0.0)
            patches = torch.stack([t(flat)[1] for _ in range(8)])
        colour = patches.mean(dim=(3, 4)).round(decimals=3)  # (8, 9, 3)
        for s in colour:
            assert len({tuple(c) for c in s.tolist()}) == distinct, mode
        if mode == "none":
            torch.testing.assert_close(colour, source_colour.expand_as(colour), atol=3e-3, rtol=0)
        else:  # augmented: not the source's colour, and images differ from one another
            assert (colour - source_colour).abs().amax() > 0.1
            assert len({tuple(s[0].tolist()) for s in colour}) == len(colour)
    with pytest.raises(ValueError, match="choose from"):
        A.BatchAugment(geo, spec, "sometimes")


def test_identity_spec_leaves_patches_in_their_cells() -> None:
    """With all jitter off, normalised patches invert to the source pixels of their cells."""
    geo = JigsawGeometry.for_image_size(64)
    yy, xx = np.mgrid[0 : geo.source_size, 0 : geo.source_size]
    coded = torch.from_numpy(np.stack([xx, yy, np.zeros_like(xx)]).astype(np.uint8))
    spec = A.PhotometricSpec(0, 0, 0, 0, photometric=0, grayscale=0, flip=0)
    image = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    _, patches, perm = A.BatchAugment(geo, spec)(image, coded.expand(2, -1, -1, -1))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for b in range(2):
        for k in range(9):
            px = ((patches[b, k] * std + mean) * 255).round()
            row, col = divmod(int(perm[b, k]), 3)
            assert col * geo.cell <= px[0].min() and px[0].max() < (col + 1) * geo.cell
            assert row * geo.cell <= px[1].min() and px[1].max() < (row + 1) * geo.cell


def test_worker_crops_match_pil_within_one_grey_level() -> None:
    """CropTransform draws its boxes as RandomResizedCrop does (same torch random stream) and
    resizes with torch's 8-bit kernel: against PIL's crop + resize of the same boxes, on
    photos of different sizes, down- and upscaling."""
    geo = JigsawGeometry()
    crop = A.CropTransform(geo)
    worst, total = 0, 0.0
    for k, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
        img = Image.fromarray(getattr(skdata, name)())
        for seed in range(3):
            torch.manual_seed(100 * k + seed)
            got = crop(img)
            torch.manual_seed(100 * k + seed)
            want = TF.pil_to_tensor(crop.image_crop(img)), TF.pil_to_tensor(crop.source_crop(img))
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape
                diff = (g.int() - w.int()).abs()
                worst, total = max(worst, int(diff.max())), total + float(diff.float().mean())
    assert worst <= 1 and total / 24 < 0.05
