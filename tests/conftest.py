"""Shared fixtures: a private cache folder per test and small real image sets on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pirl.augment import CropTransform, EncodedTransform
from pirl.data import embedded_images
from pirl.decode import EncodedImage
from pirl.jigsaw import JigsawGeometry

# Tiny tensors gain nothing from threads, and OpenMP's spinning threads slow a shared or
# busy 2-core machine by an order of magnitude; one thread also makes runs repeatable.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Point $PIRL_TOOLS_CACHE at a tmp dir so tests never write to ~/.cache."""
    monkeypatch.setenv("PIRL_TOOLS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def digit_images() -> tuple[list[np.ndarray], np.ndarray]:
    """The embedded real images at 32 px (scikit-learn digits over scikit-image photos)."""
    return embedded_images(size=32, seed=0)


def write_image_folder(root: Path, images: list[np.ndarray], labels: np.ndarray) -> Path:
    """Write images as root/<class>/<i>.png, the ImageFolder layout."""
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        d = root / f"digit{label}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path, digit_images: tuple[list[np.ndarray], np.ndarray]) -> Path:
    """48 real images of 4 classes in ImageFolder layout."""
    images, labels = digit_images
    keep = [i for i in range(len(labels)) if labels[i] < 4][:48]
    return write_image_folder(tmp_path / "data", [images[i] for i in keep], labels[keep])


def encoded_and_cropped(
    folder: Path,
) -> tuple[list[EncodedImage], list[tuple[torch.Tensor, torch.Tensor]], CropTransform]:
    """Each file of folder (sorted) through the GPU path's worker and through the CPU path,
    with the same random boxes (seed i for file i), at 96 px without reduced decoding:
    (EncodedImage items, the CPU path's crops, the CropTransform)."""
    geo = JigsawGeometry.for_image_size(96)
    enc, crop = EncodedTransform(geo, reduce=False), CropTransform(geo, reduce=False)
    items, want = [], []
    for i, path in enumerate(sorted(folder.iterdir())):
        torch.manual_seed(i)
        items.append(enc(path))
        torch.manual_seed(i)
        want.append(crop(path))
    return items, want, crop
