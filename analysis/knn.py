"""kNN accuracy per layer of a loaded encoder, on the shared extractor's cached features."""

from __future__ import annotations

from collections.abc import Sequence

from pirl.data import ImageList
from pirl.knn import KS, trunk_knn
from pirl.weights import Encoder


def encoder_knn(
    encoder: Encoder,
    train: ImageList,
    test: ImageList | None,
    layers: Sequence[str],
    image_size: int = 224,
    ks: Sequence[int] = KS,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, dict[int, float]]:
    """kNN accuracy per layer on the shared extractor's benchmark-pooled, cached features
    (test input: Resize + CenterCrop); `test=None` is leave-one-out on `train`."""
    return {
        layer: trunk_knn(
            encoder.trunk,
            train,
            test,
            layer,
            image_size,
            ks,
            device,
            batch_size,
            num_workers,
            identity=encoder.fingerprint,
            progress=progress,
        )
        for layer in layers
    }
