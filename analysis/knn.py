"""kNN accuracy per layer of a loaded encoder, on features cached under its weights' key."""

from __future__ import annotations

from collections.abc import Sequence

from pirl.data import ImageList
from pirl.features import cache_key, center_crop_transform, dataset_fingerprint, weights_fingerprint
from pirl.knn import KS, trunk_knn
from pirl.weights import Encoder


def encoder_knn(
    encoder: Encoder,
    spec: str,
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
    transform = center_crop_transform(image_size)

    def key(layer: str, split: ImageList | None) -> str | None:
        if split is None:
            return None
        fingerprint = dataset_fingerprint(split.paths)
        return cache_key(weights_fingerprint(spec), layer, fingerprint, transform, dtype="float16")

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
            cache_keys=(key(layer, train), key(layer, test)),
            progress=progress,
        )
        for layer in layers
    }
