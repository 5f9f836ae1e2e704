"""Batched PIRL augmentation: workers only crop; jigsaw and photometric ops run on whole batches.

The published pipeline (docs/reference.md) applied per view with PIL costs ~11 ms per sample
per core. Here a worker decodes and takes the two random crops (224-px view, 255-px patch
source) as uint8 tensors; everything else runs on the batch, on the training device:
the jigsaw cut with per-patch offsets and a per-sample permutation, then for the image and for
each patch its own ColorJitter(0.4, 0.4, 0.4, 0.2) (the four ops in a random order per view,
as torchvision draws it), VISSL's random photometric ops (posterize, sharpness, solarize,
autocontrast, all four with probability 0.66), RandomGrayscale(0.2), horizontal flip and
ImageNet normalisation. Each op computes what torchvision.transforms.functional computes on a
float tensor, with a per-view factor; posterize and solarize act, as PIL's do, on 8-bit
pixels: here the pixel that PIL's truncating ops would hold for the float x, floor(255 x)
(less a slack for float noise: LEVEL_SLACK).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from pirl.data import check_pixels, load_image
from pirl.decode import (
    Box,
    EncodedImage,
    JpegHeader,
    complete,
    decode_full,
    decode_on_device,
    decode_reduced,
    jpeg_header,
    read_file,
    reduction,
    scale_of,
)
from pirl.errors import UserError
from pirl.jigsaw import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PATCH_AUGMENTS,
    PHOTOMETRIC_P,
    POSTERIZE_BITS,
    SHARPNESS_FACTORS,
    SOLARIZE_THRESHOLDS,
    JigsawGeometry,
)

log = logging.getLogger(__name__)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2)


@dataclass(frozen=True)
class PhotometricSpec:
    """The published per-view augmentation: ColorJitter(b, c, s, h), VISSL's random photometric
    ops with probability photometric, grayscale p, flip p."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.2
    photometric: float = PHOTOMETRIC_P
    grayscale: float = 0.2
    flip: float = 0.5


NO_AUGMENTATION = PhotometricSpec(0, 0, 0, 0, photometric=0, grayscale=0, flip=0)


@dataclass
class PhotometricParams:
    """Per-view random parameters; order[i] is the ColorJitter op sequence (0 b, 1 c, 2 s, 3 h);
    photo[i] says whether the random photometric ops run, with bits, sharpness, threshold."""

    order: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    photo: torch.Tensor
    bits: torch.Tensor
    sharpness: torch.Tensor
    threshold: torch.Tensor
    gray: torch.Tensor
    flip: torch.Tensor

    def to(self, device: torch.device | str) -> PhotometricParams:
        """The same parameters on device (drawn on the CPU so seeded runs match anywhere)."""
        return PhotometricParams(
            *(getattr(self, k).to(device, non_blocking=True) for k in self.__dataclass_fields__)
        )


def draw_params(
    n: int, spec: PhotometricSpec = PhotometricSpec(), generator: torch.Generator | None = None
) -> PhotometricParams:
    """Independent parameters for n views with torchvision's and VISSL's distributions (CPU, so
    seeded runs draw the same numbers whatever the training device)."""

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.empty(n).uniform_(lo, hi, generator=generator)

    def factor(x: float) -> torch.Tensor:
        return uniform(max(0.0, 1 - x), 1 + x)

    def integers(both_ends: tuple[int, int]) -> torch.Tensor:
        return torch.randint(both_ends[0], both_ends[1] + 1, (n,), generator=generator)

    return PhotometricParams(  # keywords evaluate in order: the jitter's draws come first
        order=torch.argsort(torch.rand(n, 4, generator=generator), dim=1),
        brightness=factor(spec.brightness),
        contrast=factor(spec.contrast),
        saturation=factor(spec.saturation),
        hue=uniform(-spec.hue, spec.hue),
        gray=torch.rand(n, generator=generator) < spec.grayscale,
        flip=torch.rand(n, generator=generator) < spec.flip,
        photo=torch.rand(n, generator=generator) < spec.photometric,
        bits=integers(POSTERIZE_BITS),
        sharpness=uniform(*SHARPNESS_FACTORS),
        threshold=integers(SOLARIZE_THRESHOLDS),
    )


def _col(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma with torchvision's weights (ITU-R 601-2)."""
    r, g, b = x.unbind(1)
    luma = torch.mul(r, GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1])
    return luma.add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """TF.adjust_brightness per view (in place on x): blend with black."""
    return x.mul_(_col(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """TF.adjust_contrast per view (in place on x): blend with the mean luma of the view."""
    mean = x.mean(dim=(2, 3)) @ torch.tensor(GRAY_WEIGHTS, device=x.device)  # luma is linear
    return x.mul_(_col(factor)).add_(_col((1 - factor) * mean)).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """TF.adjust_saturation per view (in place on x): blend with the view's luma."""
    gray = grayscale(x).mul_(_col(1 - factor))
    return x.mul_(_col(factor)).add_(gray).clamp_(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """TF.adjust_hue per view (in place on x): rotate HSV hue by shift (in turns), keep S, V.

    Hue in turns as torchvision's RGB->HSV computes it (red wins ties, then green), back with
    the closed form c = V - V S clamp(2 - 6 d, 0, 1), d = distance of h + (n - 2) / 6 to the
    nearest integer, n = 5, 3, 1 for R, G, B: torchvision's six-sector table, with
    V S = max - min. Branch-free float arithmetic (bool masks are slow on CPU).
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    chroma.neg_().add_(maxc)
    r_max = torch.ge(r, maxc, out=torch.empty_like(maxc))
    g_max = torch.ge(g, maxc, out=torch.empty_like(maxc))
    # 6 h C = g - b if red is the max, else b - r + 2 C if green is, else r - g + 4 C.
    num = torch.lerp(
        torch.sub(r, g).add_(chroma, alpha=4), torch.sub(b, r).add_(chroma, alpha=2), g_max
    )
    torch.lerp(num, torch.sub(g, b), r_max, out=num)
    h = num.div_(chroma.clamp(min=1e-30).mul_(6)).add_((shift - 1 / 3).view(-1, 1, 1))
    for c, n in enumerate((5.0, 3.0, 1.0)):  # r, g, b are no longer needed: write in place
        d = h + n / 6
        d.sub_(torch.round(d)).abs_()
        x[:, c] = torch.addcmul(maxc, torch.rsub(d, 2, alpha=6).clamp_(0, 1), chroma, value=-1)
    return x


# PIL holds ColorJitter's output as 8-bit pixels, truncated (its blends cast to uint8), so the
# pixel a float level v stands for is floor(v), counted from this far below a level so that
# float noise (~1e-5 of a level) on values already 8-bit (after posterize, or with jitter off)
# does not drop them a level.
LEVEL_SLACK = 1e-3


def posterize(v: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """TF.posterize per view (in place on v, in 8-bit levels 0..255) of the 8-bit pixel
    floor(v + LEVEL_SLACK): its top bits, as PIL keeps v & ~(2^(8-b) - 1); integers out."""
    step = _col(2 ** (8 - bits)).to(v.dtype)  # a power of two: the division is exact
    return v.add_(LEVEL_SLACK).div_(step).floor_().mul_(step)  # floor(floor(a) / n) = floor(a / n)


def adjust_sharpness(x: torch.Tensor, factor: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """TF.adjust_sharpness per view (in place on x, values in [0, bound]): blend with the 3x3
    blur of weights 1/13 around 5/13, f x + (1 - f) blur = x + (1 - f) (box sum - 9 x) / 13,
    the box sum separable; border pixels (all of a view of 2 px or less) keep x, as in TF and
    PIL. On 8-bit levels the sums are exact, so a flat pixel keeps its level exactly, as PIL."""
    if x.shape[-2] > 2 and x.shape[-1] > 2:
        rows = x[..., :-2] + x[..., 1:-1] + x[..., 2:]
        box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
        inner = x[..., 1:-1, 1:-1]
        inner.addcmul_(box.sub_(inner, alpha=9), _col((1 - factor) / 13)).clamp_(0, bound)
    return x


def solarize(v: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """TF.solarize per view (in place on v, in 8-bit levels) at s - LEVEL_SLACK: PIL's
    v -> 255 - v where v >= s, on the pixel floor(v + LEVEL_SLACK) as PIL truncates its
    sharpness blend; s = 0 inverts all, s = 256 nothing."""
    t = _col(threshold.to(v.dtype) - LEVEL_SLACK)
    inverted = torch.ge(v, t, out=torch.empty_like(v))  # 1.0 or 0.0: no slow bool mask
    return v.addcmul_(inverted, torch.rsub(v, 255, alpha=2))  # v + (255 - 2 v) where inverted


def autocontrast(x: torch.Tensor, bound: float = 1.0) -> torch.Tensor:
    """TF.autocontrast per view of x / bound (in place on x; [0, 1] out): each channel
    stretched from its own [min, max], by a division, so that a constant channel (left as
    it is) comes out as x / bound exactly, as ToTensor divides a PIL image's pixels."""
    lo, hi = x.amin(dim=(2, 3)), x.amax(dim=(2, 3))  # 10x faster than aminmax on a CPU
    span = hi - lo
    stretch = torch.isfinite(1 / span)  # TF's test for a constant channel
    lo = torch.where(stretch, lo, 0.0)[..., None, None]
    span = torch.where(stretch, span, bound)[..., None, None]
    return x.sub_(lo).div_(span).clamp_(0, 1)


def random_photometric(
    x: torch.Tensor, bits: torch.Tensor, sharpness: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """VISSL's ImgPilRandomPhotometric once it has decided to run (in place on x in [0, 1]):
    posterize, sharpness, solarize, autocontrast, each view with its own magnitudes; in 8-bit
    levels, where posterize leaves integers, as PIL's ops see their input."""
    v = posterize(x.mul_(255), bits)
    solarize(adjust_sharpness(v, sharpness, 255), threshold)
    return autocontrast(v, 255)


JITTER_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)


def _group_plan(
    p: PhotometricParams,
) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """Sort views so that those with the same op sequence, grayscale and flip are contiguous,
    and within such a group those that run the random photometric ops last (a slice, so the
    ops' draw does not split groups); returns the sort and (start, split, stop, key) per
    group, the photometric ops on [split, stop) (one host sync)."""
    digits = torch.tensor([64, 16, 4, 1], device=p.order.device)
    key = ((p.order * digits).sum(1) * 2 + p.gray.long()) * 2 + p.flip.long()
    key, sort = torch.sort(key * 2 + p.photo.long(), stable=True)
    keys, counts = torch.unique_consecutive(key, return_counts=True)
    plan: list[tuple[int, int, int, int]] = []
    start = 0
    for k, n in zip(keys.tolist(), counts.tolist(), strict=True):
        group, photo = k >> 1, k & 1
        if photo and plan and plan[-1][3] == group:  # the group's views without the ops
            plan[-1] = (plan[-1][0], start, start + n, group)
        else:
            plan.append((start, start if photo else start + n, start + n, group))
        start += n
    return sort, plan


def photometric(
    x: torch.Tensor,
    p: PhotometricParams,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    grouped: bool | None = None,
) -> torch.Tensor:
    """uint8 (n, 3, H, W) views -> ColorJitter (ops in each view's order), random photometric
    ops, grayscale, flip, normalisation, as published. Two schedules with the same result:
    grouped (CPU default) runs views sharing an op sequence together on cache-sized slices, so
    no view pays for an op it does not use; positional (GPU default, compiled there: the first
    call of each view shape compiles for ~10 s) is one fused formula per position."""
    grouped = x.device.type == "cpu" if grouped is None else grouped
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    if grouped:
        return _grouped(x, p.to(x.device), m, s)
    run = _compiled_positional() if x.is_cuda else _positional
    return run(x, p.to(x.device), m, s)


def _grouped(
    x: torch.Tensor, p: PhotometricParams, m: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    sort, plan = _group_plan(p)
    factors = [f.index_select(0, sort) for f in (p.brightness, p.contrast, p.saturation, p.hue)]
    bits, sharpness, threshold = (
        f.index_select(0, sort) for f in (p.bits, p.sharpness, p.threshold)
    )
    out = torch.empty(x.shape, device=x.device)
    for start, split, stop, key in plan:  # one group at a time, so its work stays in cache
        sel = sort[start:stop]
        view = x.index_select(0, sel).float().div_(255)
        for pos in range(4):
            op = (key >> (8 - 2 * pos)) & 3  # base-4 digit pos of the op sequence
            JITTER_OPS[op](view, factors[op][start:stop])
        if split < stop:  # in place on the group's last views
            ops = (bits[split:stop], sharpness[split:stop], threshold[split:stop])
            random_photometric(view[split - start :], *ops)
        if key & 2:
            view.copy_(grayscale(view).expand_as(view))
        if key & 1:
            view = view.flip(-1)
        out.index_copy_(0, sel, view.sub_(m).div_(s))
    return out


def _positional(
    x: torch.Tensor, p: PhotometricParams, m: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """At each of the 4 positions every view takes its own op, as one formula over the batch:
    brightness, contrast and saturation are x <- clamp(f x + (1 - f) target) with the target
    0, the mean luma or the luma per view, and views whose op there is hue take the rotated
    hue instead; the random photometric ops run on every view and are kept where drawn. No
    host syncs and no data-dependent shapes, so torch.compile fuses it into a few kernels (on
    an H100, 7 ms -> 2 ms for 256 views of 224 px before the photometric ops; BENCHMARKS.md)."""
    x = x.float().div(255)
    for pos in range(4):
        op = p.order[:, pos]
        luma = grayscale(x)
        f = torch.where(
            op == 0,
            p.brightness,
            torch.where(op == 1, p.contrast, torch.where(op == 2, p.saturation, 1.0)),
        )
        mean = luma.mean(dim=(2, 3), keepdim=True)
        target = torch.where(_col(op == 1), mean, torch.where(_col(op == 2), luma, 0.0))
        blended = (_col(f) * x + _col(1 - f) * target).clamp(0, 1)
        x = torch.where(_col(op == 3), adjust_hue(x.clone(), p.hue), blended)
    photo = random_photometric(x.clone(), p.bits, p.sharpness, p.threshold)
    x = torch.where(_col(p.photo), photo, x)
    x = torch.where(_col(p.gray), grayscale(x).expand_as(x), x)
    x = torch.where(_col(p.flip), x.flip(-1), x)
    return (x - m) / s


@functools.cache
def _compiled_positional() -> Callable[..., torch.Tensor]:
    """_positional compiled once per process: a second view shape (image, patch) or batch
    size compiles once more, with sizes left dynamic."""
    return torch.compile(_positional)


def jigsaw_draw(
    batch: int, geometry: JigsawGeometry, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 9, 2) offsets (y, x) uniform in 0..cell-patch-1 (jigsaw.random_offsets' range, as
    VISSL) and (B, 9) permutations, as published."""
    hi = max(1, geometry.cell - geometry.patch_size)
    offsets = torch.randint(0, hi, (batch, geometry.num_patches, 2), generator=generator)
    perm = torch.argsort(torch.rand(batch, geometry.num_patches, generator=generator), dim=1)
    return offsets, perm


def cut_jigsaw(
    sources: torch.Tensor, geometry: JigsawGeometry, offsets: torch.Tensor, perm: torch.Tensor
) -> torch.Tensor:
    """(B, C, S, S) sources -> (B, 9, C, P, P) patches; slot k holds the patch of cell
    perm[b, k], at offsets[b, cell] inside that cell (same layout as jigsaw.cut_patches)."""
    p = geometry.patch_size
    off = offsets.gather(1, perm.unsqueeze(2).expand(-1, -1, 2))
    y0 = (perm // geometry.grid) * geometry.cell + off[..., 0]
    x0 = (perm % geometry.grid) * geometry.cell + off[..., 1]
    cut = _cut_by_slices if sources.device.type == "cpu" else _cut_by_gather
    return cut(sources, p, y0, x0)


def _cut_by_slices(sources: torch.Tensor, p: int, y0: torch.Tensor, x0: torch.Tensor):
    """Plain slices: cheapest on CPU."""
    ys, xs = y0.tolist(), x0.tolist()
    cut = [
        sources[b, :, y : y + p, x : x + p]
        for b in range(len(ys))
        for y, x in zip(ys[b], xs[b], strict=True)
    ]
    return torch.stack(cut).unflatten(0, y0.shape)


def _cut_by_gather(sources: torch.Tensor, p: int, y0: torch.Tensor, x0: torch.Tensor):
    """One indexed gather from the (y, x) window view: one kernel on a GPU."""
    windows = sources.unfold(2, p, 1).unfold(3, p, 1).permute(0, 2, 3, 1, 4, 5)
    b = torch.arange(len(y0), device=sources.device).view(-1, 1)
    return windows[b, y0.to(sources.device), x0.to(sources.device)]


def resize_u8(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 (3, H, W) and a (top, left, height, width) box -> uint8 (3, size, size), resized
    with torch's 8-bit antialiased bilinear kernel: PIL's filter and fixed-point arithmetic
    (within one grey level, tested), 2-3x faster than PIL on one core."""
    top, left, height, width = box
    crop = image[None, :, top : top + height, left : left + width]
    crop = crop.contiguous(memory_format=torch.channels_last)  # the vectorised uint8 kernel
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]


def resize_float(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """resize_u8 for a float (1, 3, H, W) image on a GPU (whose kernel takes no uint8): the
    same antialiased bilinear filter, left in float; DeviceDecode rounds the whole batch back
    to uint8 at once (within one grey level of the CPU's fixed-point result,
    tests/test_cuda.py)."""
    top, left, height, width = box
    crop = image[..., top : top + height, left : left + width]
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)[0]


def to_u8(values: torch.Tensor) -> torch.Tensor:
    """Float pixel values rounded back to uint8 (in place, then one cast)."""
    return values.round_().clamp_(0, 255).to(torch.uint8)


class CropTransform:
    """Worker side of the batched path: the two independent random crops as uint8 tensors.

    Returns (image (3, H, H), source (3, S, S)); without patches (NPID++) the source is empty.
    The boxes are drawn as RandomResizedCrop draws them, on the original image's size; the
    resize is resize_u8's. Given a path (ImageDataset passes one: reads_files), a JPEG's size
    comes from its header and it is decoded by libjpeg-turbo, or at 1/2, 1/4 or 1/8 of its
    size when both crops shrink by that much (reduce); other files go through load_image.
    """

    reads_files = True

    def __init__(
        self,
        geometry: JigsawGeometry,
        with_patches: bool = True,
        image_scale: float = 0.08,
        reduce: bool = True,
    ) -> None:
        self.with_patches, self.reduce = with_patches, reduce
        self.image_crop = T.RandomResizedCrop(geometry.image_size, scale=(image_scale, 1.0))
        self.source_crop = T.RandomResizedCrop(geometry.source_size, scale=(0.6, 1.0))
        self.crops = [self.image_crop] + ([self.source_crop] if with_patches else [])
        self.sizes = [c.size[0] for c in self.crops]

    def boxes(self, width: int, height: int) -> list[Box]:
        """The boxes RandomResizedCrop draws for an image of this size (torch's random stream)."""
        shape = torch.empty(()).expand(3, height, width)  # only its size is read
        return [c.get_params(shape, c.scale, c.ratio) for c in self.crops]

    def __call__(self, img: Image.Image | Path) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(img, Image.Image):
            full = TF.pil_to_tensor(img)
            return self.pair([resize_u8(full, b, s) for b, s in self._sized(img.size)])
        data = read_file(img)
        header = jpeg_header(data)
        if header is None:
            return self(load_image(img))
        check_pixels(img, header.width, header.height)
        boxes = self.boxes(header.width, header.height)
        return self.pair(self.jpeg_crops(img, data, header, boxes))

    def _sized(self, size: tuple[int, int]) -> list[tuple[Box, int]]:
        return list(zip(self.boxes(*size), self.sizes, strict=True))

    def pair(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, source), the source empty without patches."""
        return crops[0], crops[1] if self.with_patches else torch.empty(0, dtype=torch.uint8)

    def jpeg_crops(
        self, path: Path, data: bytes | bytearray, header: JpegHeader, boxes: list[Box]
    ) -> list[torch.Tensor]:
        """The crops of these boxes from the JPEG's bytes, on the CPU."""
        k = reduction(boxes, self.sizes) if self.reduce else 1
        if k > 1:
            small = decode_reduced(path, data, header, k)
            k = scale_of(small, header)
            return [
                TF.pil_to_tensor(
                    small.resize(
                        (s, s), Image.BILINEAR, box=(x / k, y / k, (x + w) / k, (y + h) / k)
                    )
                )
                for (y, x, h, w), s in zip(boxes, self.sizes, strict=True)
            ]
        full = decode_full(data, header)
        if full is None:
            full = TF.pil_to_tensor(load_image(path))
        return [resize_u8(full, b, s) for b, s in zip(boxes, self.sizes, strict=True)]


class EncodedTransform(CropTransform):
    """Worker side of decoding on the GPU: the file's bytes and the two crop boxes (drawn from
    the header's size exactly as CropTransform draws them), decoded and cropped on the device
    by DeviceDecode. Files nvJPEG would refuse (not a JPEG, CMYK, cut short) are decoded and
    cropped here instead, with CropTransform's checks and errors, and so is every frame but
    an 8-bit sequential Huffman one (JpegHeader.sequential_8bit): nvJPEG takes progressive
    JPEGs on its software path, whose entropy decoding runs on the host one image at a time,
    in the training process rather than in parallel workers, and arithmetic-coded, lossless
    or 12-bit ones fail its batch."""

    def __call__(self, img: Image.Image | Path) -> EncodedImage:  # type: ignore[override]
        if isinstance(img, Image.Image):
            raise TypeError("EncodedTransform reads files: give it the path")
        data = read_file(img)
        header = jpeg_header(data)
        if header is None:
            image = load_image(img)
            boxes = self.boxes(*image.size)
            full = TF.pil_to_tensor(image)
            crops = [resize_u8(full, b, s) for b, s in zip(boxes, self.sizes, strict=True)]
            return EncodedImage(str(img), boxes, crops=crops)
        check_pixels(img, header.width, header.height)
        boxes = self.boxes(header.width, header.height)
        if header.components == 4 or not header.sequential_8bit or not complete(data):
            return EncodedImage(str(img), boxes, crops=self.jpeg_crops(img, data, header, boxes))
        return EncodedImage(str(img), boxes, data=data)


def require_gpu_decode(device: torch.device) -> None:
    """--decode gpu's preconditions, checked before a run claims its folder: a CUDA training
    device, and PyTorch's native caching allocator (DeviceDecode says why)."""
    if device.type != "cuda":
        raise UserError(f"--decode gpu: the training device is {device}, not a CUDA GPU")
    if torch.cuda.get_allocator_backend() != "native":
        raise UserError(
            "--decode gpu needs PyTorch's native CUDA allocator: with "
            "PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync nvJPEG could overwrite memory the "
            "training stream still reads"
        )


class DeviceDecode:
    """Main-process side of decoding on the GPU: a batch of EncodedImage -> the uint8 crops
    (images (B, 3, H, H), sources (B, 3, S, S) or empty) on the device, for BatchAugment.
    JPEGs go through nvJPEG in one call, then the crop and resize of the worker's boxes; one
    the device refuses is decoded on the CPU as CropTransform would (or fails as it would).

    On CUDA all of it runs on a side stream (from torch's pool, never the training stream).
    torchvision allocates the decoded images on the caller's current stream but has nvJPEG
    write them from a private stream that does not wait for the caller's
    (pytorch/vision#9606): on the training stream it may be handed a block the queued
    backward still reads, and overwrite it. On the side stream the only blocks it can get are
    those our earlier decodes freed, or crops the training stream has finished with
    (record_stream). The host wait on the side stream before each decode must stay a host
    wait: nvJPEG's hardware engine is reported not to honour a stream-side wait either (in
    training it costs nothing: every step already waits for its loss). The caching
    allocator's per-stream pools are what keep the training stream's blocks out of reach, so
    --decode gpu requires the native allocator (require_gpu_decode)."""

    def __init__(self, crop: CropTransform) -> None:
        self.crop = crop
        self.stream: torch.cuda.Stream | None = None  # made on the first CUDA batch
        self.refused = 0  # JPEGs the device decoder refused, decoded on the CPU instead

    def __call__(
        self, items: list[EncodedImage], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if device.type != "cuda":
            return self.decode(items, device)
        main = torch.cuda.current_stream(device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self.stream):
            self.stream.synchronize()
            images, sources = self.decode(items, device)
        main.wait_stream(self.stream)
        for t in (images, sources):
            if t.numel():  # an empty tensor (no patches) holds no block
                t.record_stream(main)
        return images, sources

    def decode(
        self, items: list[EncodedImage], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The crops, on the current stream (on CUDA: the side stream, see above). Per image
        one conversion to float and one resize per crop; the rounding back to uint8 is one
        op per view for the whole batch, so the host launches about 3 kernels an image."""
        decoded = iter(decode_on_device([e.data for e in items if e.crops is None], device))
        views: list[list[torch.Tensor]] = [[] for _ in self.crop.sizes]
        for e in items:
            full = None if e.crops is not None else next(decoded)
            if full is not None:
                image = full[None].float()
                sizes = zip(e.boxes, self.crop.sizes, strict=True)
                crops = [resize_float(image, b, s) for b, s in sizes]
            else:
                cpu = e.crops or self.on_cpu(e)
                crops = [c.to(device, non_blocking=True).float() for c in cpu]
            for view, c in zip(views, crops, strict=True):
                view.append(c)
        images = to_u8(torch.stack(views[0]))
        if not self.crop.with_patches:
            return images, torch.empty(0, device=device)
        return images, to_u8(torch.stack(views[1]))

    def on_cpu(self, e: EncodedImage) -> list[torch.Tensor]:
        """The crops of a JPEG the device refused, as CropTransform takes them (or its error)."""
        self.refused += 1
        if self.refused == 1:
            log.warning(
                "%s: the GPU's JPEG decoder refused it; decoded on the CPU (further refusals "
                "are not logged)",
                e.path,
            )
        path = Path(e.path)
        data = read_file(path)
        return self.crop.jpeg_crops(path, data, jpeg_header(data), e.boxes)


class BatchAugment:
    """Main-process side: uint8 crops -> normalised image views and shuffled augmented patches.

    Random parameters come from a CPU generator (seed it per epoch for exact resume) and are
    independent for every image; for the patches, `patch_augment` (PATCH_AUGMENTS) says whether
    each patch draws its own (the paper's), the nine of an image share one draw, or none is
    applied (only the normalisation).
    """

    def __init__(
        self,
        geometry: JigsawGeometry,
        spec: PhotometricSpec = PhotometricSpec(),
        patch_augment: str = "independent",
    ):
        if patch_augment not in PATCH_AUGMENTS:
            raise ValueError(f"patch_augment {patch_augment!r}: choose from {PATCH_AUGMENTS}")
        self.geometry, self.spec, self.patch_augment = geometry, spec, patch_augment

    def __call__(
        self,
        images: torch.Tensor,
        sources: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """images (B, 3, H, H) uint8, sources (B, 3, S, S) uint8 or None -> (images float,
        patches (B, 9, 3, P, P) float or None, perm (B, 9) or None)."""
        batch, dev = images.shape[0], images.device
        out = photometric(images, draw_params(batch, self.spec, generator).to(dev))
        if sources is None:
            return out, None, None
        offsets, perm = jigsaw_draw(batch, self.geometry, generator)
        patches = cut_jigsaw(sources, self.geometry, offsets, perm).flatten(0, 1)
        params = self.patch_params(batch, generator).to(dev)
        patches = photometric(patches, params).unflatten(0, (batch, self.geometry.num_patches))
        return out, patches, perm

    def patch_params(self, batch: int, generator: torch.Generator | None) -> PhotometricParams:
        """Parameters of the batch's 9 x B patches, image-major, as patch_augment says."""
        n = self.geometry.num_patches
        if self.patch_augment == "independent":
            return draw_params(batch * n, self.spec, generator)
        if self.patch_augment == "none":
            return draw_params(batch * n, NO_AUGMENTATION, generator)
        one = draw_params(batch, self.spec, generator)
        return PhotometricParams(
            *(getattr(one, k).repeat_interleave(n, 0) for k in one.__dataclass_fields__)
        )
