"""Image data sets: ImageFolder or flat folders on disk, and the small embedded default set."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pirl.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}
EMBEDDED_VERSION = "embedded-v2"
# Pillow's decompression-bomb limit (2 x 89.5 M pixels). We enforce it ourselves, before
# decoding, so that it is one clear error (or a skipped image) and so a user can raise it.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
MAX_PIXELS_ENV = "PIRL_TOOLS_MAX_PIXELS"
Image.MAX_IMAGE_PIXELS = None  # load_image checks max_pixels() instead
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


@dataclass
class ImageList:
    """Files and integer labels of a data set; label -1 for an unlabelled flat folder."""

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS


def list_images(root: str | Path) -> ImageList:
    """Read an ImageFolder tree (one sub-folder per class) or a flat folder searched recursively."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: data folder does not exist")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    top_images = sorted(p for p in root.iterdir() if _is_image(p))
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    if subdirs and not top_images:
        for d in subdirs:
            files = sorted(p for p in d.rglob("*") if _is_image(p))
            if files:
                classes.append(d.name)
                paths += files
                labels += [len(classes) - 1] * len(files)
    else:
        paths = sorted(p for p in root.rglob("*") if _is_image(p))
        labels = [-1] * len(paths)
    if not paths:
        exts = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTS))
        raise UserError(f"{root}: no images ({exts}) found")
    return ImageList(root, paths, labels, classes)


def max_pixels() -> int:
    """The largest image (width x height) decoded: $PIRL_TOOLS_MAX_PIXELS or Pillow's bomb
    limit. An environment variable, so that DataLoader workers see what the command set."""
    value = os.environ.get(MAX_PIXELS_ENV, "")
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise UserError(f"{MAX_PIXELS_ENV}={value!r}: expected a positive number of pixels")
    return limit


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any source mode: 16-bit grey scaled (65535 -> 255) instead of clipped to
    white, palette transparency resolved through RGBA, alpha dropped, CMYK and grey converted."""
    if img.mode in SIXTEEN_BIT:
        grey = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257.0
        return Image.fromarray(grey.round().astype(np.uint8), "L").convert("RGB")
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def require_files(paths: Sequence[Path], listing: str | Path, shown: int = 3) -> None:
    """Every image a split lists must exist before any compute: one line counting the missing
    ones and naming the first few (a worker's traceback hours in is the alternative)."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        names = ", ".join(str(p) for p in missing[:shown])
        more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
        raise UserError(
            f"{listing}: {len(missing)} of {len(paths)} listed images are missing: {names}{more}"
        )


def check_pixels(path: Path, width: int, height: int) -> None:
    """Refuse an image over max_pixels() before any decoding (a decompression bomb costs
    nothing to refuse), one line naming it."""
    pixels, limit = width * height, max_pixels()
    if pixels > limit:
        raise UserError(
            f"{path}: {width}x{height} image ({pixels / 1e6:.0f} M pixels) is over the limit "
            f"of {limit / 1e6:.0f} M (a decompression bomb?); raise it with {MAX_PIXELS_ENV} "
            "if the image is genuine"
        )


@contextmanager
def unreadable(path: Path) -> Iterator[None]:
    """Whatever a decoder raises for a bad file, as the one-line UserError naming it."""
    try:
        yield
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
        raise UserError(f"{path}: unreadable image ({reason})") from None


def load_image(path: Path) -> Image.Image:
    """Decode fully (so truncation is caught here) to 8-bit RGB; any unreadable, empty,
    truncated or oversized file is a UserError naming it."""
    with unreadable(path), Image.open(path) as img:
        check_pixels(path, img.width, img.height)
        img.load()
        return to_rgb(img)


class ImageDataset(torch.utils.data.Dataset):
    """Yields (transform(image), label, index); bad images raise or, with skip_bad, yield None.
    A transform with reads_files set gets the path and decodes itself (for its crops only)."""

    def __init__(
        self, images: ImageList, transform: Callable[[Image.Image], Any], skip_bad: bool = False
    ):
        self.images, self.transform, self.skip_bad = images, transform, skip_bad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int, int] | None:
        try:
            path = self.images.paths[index]
            if getattr(self.transform, "reads_files", False):
                out = self.transform(path)
            else:
                out = self.transform(load_image(path))
        except UserError as exc:
            if not self.skip_bad:
                raise
            log.warning("skipping %s", exc)
            return None
        return out, self.images.labels[index], index


def collate_skipping(batch: list[Any]) -> tuple[Any, int]:
    """Default collate over the good samples; also returns how many were skipped. Views that
    are not tensors (a worker's undecoded JPEG for the device: EncodedImage) stay a list."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, skipped
    if isinstance(good[0][0], torch.Tensor | tuple | list):
        return torch.utils.data.default_collate(good), skipped
    rest = torch.utils.data.default_collate([b[1:] for b in good])
    return ([b[0] for b in good], *rest), skipped


def cache_dir() -> Path:
    """Where generated data lives: $PIRL_TOOLS_CACHE or ~/.cache/pirl-tools."""
    return Path(os.environ.get("PIRL_TOOLS_CACHE", Path.home() / ".cache" / "pirl-tools"))


def _photos() -> list[np.ndarray]:
    """Colour photographs that ship inside scikit-image (no download)."""
    from skimage import data as skdata

    return [getattr(skdata, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]


# The embedded set's two colours: every digit is drawn in GLYPH over BACKGROUND (mixed with a
# faint photo texture), so the digit's shape is what tells one image from another.
BACKGROUND = (174.0, 14.0, 56.0)
GLYPH = (81.0, 241.0, 199.0)
TEXTURE = 0.3  # share of the photo crop in the background


def embedded_images(size: int = 32, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """scikit-learn's 1,797 real handwritten digits, upsampled to 80-100% of the image at a
    random place, in one colour over one background colour textured by a random crop of
    scikit-image's sample photos: a small real set with 10 classes whose images differ in the
    digit's shape and place and the texture, not in colour."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    photos = _photos()
    background, glyph_colour = np.array(BACKGROUND), np.array(GLYPH)
    out: list[np.ndarray] = []
    for img8 in digits.images:
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        side = int(64 * rng.uniform(1.5, 4.0))
        y, x = rng.integers(0, h - side), rng.integers(0, w - side)
        texture = Image.fromarray(photo[y : y + side, x : x + side]).resize(
            (size, size), Image.BILINEAR
        )
        canvas = background * (1 - TEXTURE) + np.asarray(texture, dtype=np.float64) * TEXTURE
        glyph_size = int(size * rng.uniform(0.8, 1.0))
        glyph = Image.fromarray((img8 / 16.0 * 255).astype(np.uint8)).resize(
            (glyph_size, glyph_size), Image.BICUBIC
        )
        alpha = np.asarray(glyph, dtype=np.float64)[..., None] / 255.0
        oy, ox = rng.integers(0, size - glyph_size + 1, size=2)
        under = canvas[oy : oy + glyph_size, ox : ox + glyph_size]
        canvas[oy : oy + glyph_size, ox : ox + glyph_size] = (
            under * (1 - alpha) + glyph_colour * alpha
        )
        out.append(canvas.clip(0, 255).astype(np.uint8))
    return out, digits.target.astype(np.int64)


def cached_folder(name: str, build: Callable[[Path], None]) -> Path:
    """A generated folder under cache_dir(), built once into a temp folder and renamed into
    place, so an interrupted or concurrent build never leaves a half-written data set."""
    root = cache_dir() / name
    if (root / ".complete").exists():
        return root
    tmp = root.with_name(f"{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    (tmp / ".complete").touch()
    try:
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return root


def embedded_root(size: int = 32) -> Path:
    """Write the embedded set once as an ImageFolder tree (train/, val/ at 4:1); return its root."""

    def build(tmp: Path) -> None:
        images, labels = embedded_images(size)
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            d = tmp / ("val" if i % 5 == 0 else "train") / f"digit{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.png")

    return cached_folder(f"{EMBEDDED_VERSION}-{size}", build)
