"""Frozen-trunk features: any stage, the benchmarks' pooling, sharded batch inference, disk cache.

Every evaluation (SVM and linear probes, kNN, invariance) goes through `FeatureExtractor`, so
that one layer name means the same vector everywhere, and the extractor alone keys the disk
cache, so whether two evaluations share features never depends on which one asks.

Pooling (VISSL's VOC07/linear benchmark for ResNet-50 at 224, about 9k dims per layer):
conv1 avgpool k10 s10 p4 (112 -> 12x12), res2 k16 s8 (56 -> 6x6), res3 k13 s5 (28 -> 4x4),
res4 k8 s3 (14 -> 3x3), res5 k6 s1 (7 -> 2x2); `res5avg` is the res5 global average. At
other input sizes the stage maps differ, so the same output grid is obtained with adaptive
average pooling; at other widths the grid is the same and the dims scale with the channels.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from pirl.data import ImageDataset, ImageList, cache_dir
from pirl.engine import progress as progress_bar
from pirl.engine import resolve_device
from pirl.engine import world as dist_world
from pirl.trunk import Trunk

if TYPE_CHECKING:
    from pirl.weights import Encoder

LAYERS = ("conv1", "res2", "res3", "res4", "res5", "res5avg")
# (kernel, stride, padding) of the published pooling, the stage map size it was designed for
# (ResNet-50 at 224), and the output grid it gives.
BENCHMARK_POOL = {
    "conv1": ((10, 10, 4), 112, 12),
    "res2": ((16, 8, 0), 56, 6),
    "res3": ((13, 5, 0), 28, 4),
    "res4": ((8, 3, 0), 14, 3),
    "res5": ((6, 1, 0), 7, 2),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stage(layer: str) -> str:
    if layer not in LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose from {LAYERS}")
    return "res5" if layer == "res5avg" else layer


def pool_stage(x: torch.Tensor, layer: str) -> torch.Tensor:
    """Pool a stage map to the benchmark's grid and flatten channel-major ((C, h, w) order, which
    the linear probe's per-channel BatchNorm relies on), so probes see ~9k dims per layer."""
    if _stage(layer) != layer:
        return x.mean(dim=(2, 3))
    (k, s, p), ref, grid = BENCHMARK_POOL[layer]
    if x.shape[-2:] == (ref, ref):
        x = F.avg_pool2d(x, k, s, p)
    else:
        x = F.adaptive_avg_pool2d(x, grid)
    return x.flatten(1)


def pool_grid(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Average over a grid x grid partition, cells row-major with the channels inside each: the
    layout of per-patch features concatenated in jigsaw cell order (grid 1: global average)."""
    return F.adaptive_avg_pool2d(x, grid).permute(0, 2, 3, 1).flatten(1)


def feature_dim(trunk: Trunk, layer: str) -> int:
    """Length of one pooled feature vector: channels times the benchmark grid cells."""
    channels = trunk.channels[_stage(layer)]
    if layer == "res5avg":
        return channels
    return channels * BENCHMARK_POOL[layer][2] ** 2


def feature_channels(trunk: Trunk, layer: str) -> int:
    """Channels of the pooled (C, h, w) map a feature row flattens channel-major: what the
    linear probe's BatchNorm normalises over (VISSL's eval_mlp in_channels)."""
    return trunk.channels[_stage(layer)]


def resize_transform(size: int = 224) -> T.Compose:
    """The VOC07 SVM input as VISSL makes it: shorter side to 256/224 of size, then the whole
    image squashed to size x size (two bilinear steps, not one), ImageNet-normalised."""
    return T.Compose(
        [
            T.Resize(round(size * 256 / 224)),
            T.Resize((size, size)),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def center_crop_transform(size: int = 224) -> T.Compose:
    """The linear-probe test input: Resize(256/224 * size) then CenterCrop(size)."""
    return T.Compose(
        [
            T.Resize(round(size * 256 / 224)),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _paths_fingerprint(paths: Sequence[str | Path]) -> str:
    """A data set named by its ordered file list (row i of the features is file i)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(Path(p).resolve()).encode())
        h.update(b"\0")
    return f"{len(paths)}:{h.hexdigest()[:16]}"


class FeatureExtractor:
    """A frozen trunk plus the benchmark pooling of one layer (or several from one forward:
    `extract_layers`, `forward_layers`); batches go in, vectors come out.

    Built from an `Encoder` (`for_encoder`), it caches features on disk under a key it makes
    itself from everything that decides them, so every caller asking for the same features
    shares one entry; built from a bare trunk (one still training) it caches nothing.
    """

    def __init__(
        self,
        trunk: Trunk,
        layer: str = "res5",
        device: str | torch.device = "auto",
        amp: bool = True,
        grid: int | None = None,
        identity: str | None = None,
        alone: bool = False,
    ) -> None:
        self.stage = _stage(layer)
        self.layer = layer
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.cuda = self.device.type == "cuda"
        self.amp = amp and self.cuda
        self.trunk = trunk.eval().requires_grad_(False).to(self.device)
        if self.cuda:
            self.trunk = self.trunk.to(memory_format=torch.channels_last)
        self.grid = grid  # None: the benchmark pooling; else pool_grid (invariance analysis)
        grid_dim = trunk.channels[self.stage] * (grid or 1) ** 2
        self.dim = feature_dim(trunk, layer) if grid is None else grid_dim
        self.identity = identity  # what decides the trunk's weights; None: never cached
        # alone: this process extracts every item itself, even under torch.distributed (the
        # pretraining monitor runs on rank 0 while the other ranks go on training)
        self.alone = alone

    @classmethod
    def for_encoder(
        cls,
        encoder: Encoder,
        layer: str = "res5",
        device: str | torch.device = "auto",
        grid: int | None = None,
        amp: bool = True,
    ) -> FeatureExtractor:
        """An extractor whose cache is keyed on the encoder's weights, not on how it was named
        (amp: float16 autocast on CUDA; off, the reference's float32 features)."""
        return cls(encoder.trunk, layer, device, amp, grid=grid, identity=encoder.fingerprint)

    def at(self, layer: str) -> FeatureExtractor:
        """The same frozen trunk, device and weights identity at another layer (its own cache
        entries: the key never depends on which layers were extracted together)."""
        return FeatureExtractor(self.trunk, layer, self.device, self.amp, self.grid, self.identity)

    @torch.no_grad()
    def forward_layers(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pooled float32 features of every layer from ONE trunk forward of a batch of
        normalised images (N, 3, H, W): what lets several probes share each pass."""
        x = x.to(self.device, non_blocking=True)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            maps = self.trunk(x, tuple({_stage(layer) for layer in layers}))
            if self.grid is not None:
                return {
                    layer: pool_grid(maps[_stage(layer)].float(), self.grid) for layer in layers
                }
            return {layer: pool_stage(maps[_stage(layer)].float(), layer) for layer in layers}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled float32 features of a batch of normalised images (N, 3, H, W) -> (N, dim)."""
        return self.forward_layers(x, (self.layer,))[self.layer]

    def _cache_path(self, images: ImageList, view: Any, dtype: str) -> Path | None:
        """One file per (weights, layer, pooling, autocast, ordered files, view, dtype), whoever
        asks, so equal features are computed once; None when the weights have no identity."""
        if self.identity is None:
            return None
        parts = {
            "weights": self.identity,
            "layer": self.layer,
            "grid": self.grid,
            "amp": self.amp,
            "dataset": _paths_fingerprint(images.paths),
            "view": repr(view),
            "dtype": dtype,
        }
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
        return cache_dir() / "features" / f"{key}.npy"

    def extract(
        self,
        images: ImageList,
        view: Callable[..., Any] | torch.utils.data.Dataset,
        batch_size: int = 64,
        num_workers: int = 0,
        dtype: str = "float16",
        progress: bool = True,
    ) -> np.ndarray:
        """Features of `images` seen through `view`, so a second probe on the same features starts
        at once. `view` is a transform of each image (row i = image i) or a data set built over
        `images` (e.g. several patches per image; item[0] is the input); its repr names it in
        the cache key. Under torch.distributed each rank runs a strided shard and the shards
        are all-gathered."""
        return self.extract_layers(
            images, view, (self.layer,), batch_size, num_workers, dtype, progress
        )[self.layer]

    def extract_layers(
        self,
        images: ImageList,
        view: Callable[..., Any] | torch.utils.data.Dataset,
        layers: Sequence[str],
        batch_size: int = 64,
        num_workers: int = 0,
        dtype: str = "float16",
        progress: bool = True,
    ) -> dict[str, np.ndarray]:
        """`extract` for several layers in ONE pass over the data (one trunk forward per batch
        for every layer not already cached); each layer is cached as if extracted alone."""
        if isinstance(view, torch.utils.data.Dataset):
            if getattr(view, "images", None) is not images:
                raise ValueError("a data-set view must be built over the images it is asked for")
            dataset = view
        else:
            dataset = ImageDataset(images, view)
        paths = {layer: self.at(layer)._cache_path(images, view, dtype) for layer in layers}
        done = {
            layer: np.load(path, mmap_mode="r")
            for layer, path in paths.items()
            if path is not None and path.exists()
        }
        todo = [layer for layer in dict.fromkeys(layers) if layer not in done]
        if not todo:
            return {layer: done[layer] for layer in layers}
        rank, world = (0, 1) if self.alone else dist_world()
        n = len(dataset)
        shard = list(range(rank, n, world))
        local = self._run(dataset, shard, todo, batch_size, num_workers, progress and rank == 0)
        for layer in todo:
            feats = self._gather(local[layer], n, world) if world > 1 else local[layer].numpy()
            path = paths[layer]
            if path is None:
                done[layer] = feats.astype(dtype, copy=False)
                continue
            if rank == 0:
                self._write_cache(path, feats, dtype)
            if world > 1:
                torch.distributed.barrier()
            done[layer] = np.load(path, mmap_mode="r")
        return {layer: done[layer] for layer in layers}

    def _run(
        self,
        dataset: torch.utils.data.Dataset,
        indices: list[int],
        layers: Sequence[str],
        batch_size: int,
        num_workers: int,
        progress: bool,
    ) -> dict[str, torch.Tensor]:
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=self.cuda,
        )
        out = {layer: torch.empty(len(indices), self.at(layer).dim) for layer in layers}
        i = 0
        batches = progress_bar(loader, desc=f"features {','.join(layers)}") if progress else loader
        for batch in batches:
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            feats = self.forward_layers(x, layers)
            for layer in layers:
                out[layer][i : i + len(x)] = feats[layer].cpu()
            i += len(x)
        return out

    def _gather(self, local: torch.Tensor, n: int, world: int) -> np.ndarray:
        per, dim = (n + world - 1) // world, local.shape[1]
        padded = torch.zeros(per, dim, device=self.device)
        padded[: len(local)] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        # rank r held items r, r + world, ...: stacking on dim 1 restores dataset order
        stacked = torch.stack(parts, dim=1).reshape(per * world, dim)
        return stacked[:n].cpu().numpy()

    @staticmethod
    def _write_cache(path: Path, feats: np.ndarray, dtype: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=feats.shape)
        mm[:] = feats
        mm.flush()
        del mm
        os.replace(tmp, path)
