"""The jigsaw transform: cut a crop into a 3x3 grid, take a jittered patch per cell, shuffle."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# VISSL's ImgPilRandomPhotometric (img_pil_random_photometric.py, pil_photometric_transforms_lib.py)
PHOTOMETRIC_P = 0.66
POSTERIZE_BITS = (4, 8)  # both ends drawn: randint(4, 9)
SHARPNESS_FACTORS = (0.1, 1.9)  # continuous uniform, upper end excluded
SOLARIZE_THRESHOLDS = (0, 256)  # both ends drawn: randint(0, 257); 256 inverts nothing
# How the nine patches of one image are augmented: each its own draw (VISSL's PIRL), one draw
# shared by the nine, or none (cut and normalised only).
PATCH_AUGMENTS = ("independent", "shared", "none")
NPID_HUE = 0.4  # VISSL's NPID++ jitter (PIRL's is 0.2)


@dataclass(frozen=True)
class JigsawGeometry:
    """Published sizes at 224: 255-px patch source, 3x3 cells of 85 px, 64-px patches."""

    image_size: int = 224
    source_size: int = 255
    grid: int = 3
    patch_size: int = 64

    @property
    def cell(self) -> int:
        return self.source_size // self.grid

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @classmethod
    def for_image_size(cls, image_size: int) -> JigsawGeometry:
        """Scale the published geometry proportionally, so small images keep its ratios."""
        if image_size == 224:
            return cls()
        cell = max(2, round(255 / 224 * image_size / 3))
        patch = max(1, round(64 / 85 * cell))
        return cls(image_size, 3 * cell, 3, patch)


def random_offsets(
    geometry: JigsawGeometry, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(9, 2) offsets (y, x) of each patch inside its cell, uniform in 0..cell-patch-1 as VISSL
    draws its jitter (randint(0, 21) in the 85-px cell: a 64-px patch never touches the cell's
    far edge); offset 0 alone when the patch fills the cell."""
    hi = max(1, geometry.cell - geometry.patch_size)
    return torch.randint(0, hi, (geometry.num_patches, 2), generator=generator)


def patch_boxes(geometry: JigsawGeometry, offsets: torch.Tensor) -> torch.Tensor:
    """(9, 4) boxes (y0, x0, y1, x1) in source pixels, cells in row-major order."""
    cells = torch.arange(geometry.num_patches)
    y0 = (cells // geometry.grid) * geometry.cell + offsets[:, 0]
    x0 = (cells % geometry.grid) * geometry.cell + offsets[:, 1]
    p = geometry.patch_size
    return torch.stack([y0, x0, y0 + p, x0 + p], dim=1)


def cut_patches(
    source: torch.Tensor, geometry: JigsawGeometry, offsets: torch.Tensor, perm: torch.Tensor
) -> torch.Tensor:
    """(C, S, S) source -> (9, C, P, P) patches; output slot k holds the patch of cell perm[k]."""
    boxes = patch_boxes(geometry, offsets).tolist()
    patches = torch.stack([source[:, y0:y1, x0:x1] for y0, x0, y1, x1 in boxes])
    return patches[perm]


def unshuffle(patches: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of the shuffle in cut_patches: patches back in cell (row-major) order."""
    out = torch.empty_like(patches)
    out[perm] = patches
    return out


class RandomPhotometric:
    """VISSL's ImgPilRandomPhotometric: with probability p, all four of its PIL ops in turn.

    posterize v -> v & ~(2^(8-b) - 1), b uniform in {4, ..., 8}; sharpness: blend with PIL's
    3x3 SMOOTH blur, factor uniform in [0.1, 1.9); solarize v -> 255 - v where v >= s, s uniform
    in {0, ..., 256}; autocontrast: each channel stretched from its [min, max] to [0, 255], no
    cutoff. VISSL decides with torch's generator and draws the magnitudes with numpy's global
    one; here all come from torch's, so seeding torch seeds the whole PIL path.
    """

    def __init__(self, p: float = PHOTOMETRIC_P) -> None:
        self.p = p

    def draw(self) -> tuple[int, float, int] | None:
        """(bits, sharpness factor, solarize threshold), or None when the ops are skipped."""
        if torch.rand(()) >= self.p:
            return None
        bits = int(torch.randint(POSTERIZE_BITS[0], POSTERIZE_BITS[1] + 1, ()))
        factor = float(torch.empty(()).uniform_(*SHARPNESS_FACTORS))
        threshold = int(torch.randint(SOLARIZE_THRESHOLDS[0], SOLARIZE_THRESHOLDS[1] + 1, ()))
        return bits, factor, threshold

    @staticmethod
    def apply(img: Image.Image, bits: int, factor: float, threshold: int) -> Image.Image:
        """The four ops with given magnitudes, in VISSL's order."""
        img = ImageEnhance.Sharpness(ImageOps.posterize(img, bits)).enhance(factor)
        return ImageOps.autocontrast(ImageOps.solarize(img, threshold))

    def __call__(self, img: Image.Image) -> Image.Image:
        drawn = self.draw()
        return img if drawn is None else self.apply(img, *drawn)


def photometric(hue: float = 0.2, photometric_p: float = PHOTOMETRIC_P) -> T.Compose:
    """Per-view augmentation as VISSL's PIRL config: colour jitter, its random photometric ops,
    grayscale 0.2, flip, ImageNet norm (hue and the ops' probability: the embedded recipe's)."""
    return T.Compose(
        [
            T.ColorJitter(0.4, 0.4, 0.4, hue),
            RandomPhotometric(photometric_p),
            T.RandomGrayscale(0.2),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class PirlTransform:
    """PIL path: image view I and its jigsaw view I^t from independent random crops.

    Returns (image (3,H,H), patches (9,3,P,P), perm (9,)) with each patch augmented as
    patch_augment says (PATCH_AUGMENTS: its own draw, one draw for the nine, or none); without
    patches (NPID++) the last two are empty.
    """

    def __init__(
        self,
        geometry: JigsawGeometry,
        with_patches: bool = True,
        image_scale: float = 0.08,
        hue: float = 0.2,
        photometric_p: float = PHOTOMETRIC_P,
        patch_augment: str = "independent",
    ) -> None:
        if patch_augment not in PATCH_AUGMENTS:
            raise ValueError(f"patch_augment {patch_augment!r}: choose from {PATCH_AUGMENTS}")
        self.geometry, self.with_patches = geometry, with_patches
        self.image_crop = T.RandomResizedCrop(geometry.image_size, scale=(image_scale, 1.0))
        self.source_crop = T.RandomResizedCrop(geometry.source_size, scale=(0.6, 1.0))
        self.augment = photometric(hue, photometric_p)
        self.patch_augment = patch_augment
        self.normalise = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.geometry
        image = self.augment(self.image_crop(img))
        if not self.with_patches:
            return image, torch.empty(0), torch.empty(0, dtype=torch.long)
        source = self.source_crop(img)
        perm = torch.randperm(g.num_patches)
        boxes = patch_boxes(g, random_offsets(g)).tolist()
        cells = [source.crop((x0, y0, x1, y1)) for y0, x0, y1, x1 in boxes]
        if self.patch_augment == "none":
            return image, torch.stack([self.normalise(cells[int(k)]) for k in perm]), perm
        if self.patch_augment == "independent":
            return image, torch.stack([self.augment(cells[int(k)]) for k in perm]), perm
        state = torch.get_rng_state()  # shared: every patch replays the first patch's draws
        patches = []
        for k in perm:
            torch.set_rng_state(state)
            patches.append(self.augment(cells[int(k)]))
        return image, torch.stack(patches), perm


class NpidTransform:
    """VISSL's NPID++ view (npid++_4nodes_resnet.yaml): ColorJitter(0.4, 0.4, 0.4, hue 0.4) on
    the whole image, then RandomResizedCrop, a horizontal flip and ImageNet normalisation; no
    grayscale and no photometric ops. Returns (image (3,H,H), empty, empty), as PirlTransform
    does without patches."""

    def __init__(self, image_size: int, image_scale: float = 0.08) -> None:
        self.view = T.Compose(
            [
                T.ColorJitter(0.4, 0.4, 0.4, NPID_HUE),
                T.RandomResizedCrop(image_size, scale=(image_scale, 1.0)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.view(img), torch.empty(0), torch.empty(0, dtype=torch.long)
