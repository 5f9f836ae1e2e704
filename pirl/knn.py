"""Weighted kNN classification on frozen features with an exact torch search (one matrix
product and top-k per chunk of queries, on the GPU when present): the pretraining monitor,
`transfer knn` and the analysis all score a trunk with it.

Votes follow NPID (Wu et al. 2018): a query's k nearest training features by cosine similarity
s_j each add exp(s_j / T) (T = 0.07) to the score of their class; the top score wins. Features
are L2-normalised first, so the inner product is the cosine similarity, and the search is exact
(what faiss's IndexFlatIP computed: float32 inner products, the k largest).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pirl.data import ImageList
from pirl.features import FeatureExtractor, center_crop_transform
from pirl.trunk import Trunk

TEMPERATURE = 0.07
KS = (20, 200)
CHUNK_ELEMENTS = 2**26  # similarities held at once: 256 MB of float32 per query chunk


def unit_rows(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float32, C-contiguous, unit-L2 rows: what makes the inner product a cosine."""
    x = np.asarray(x.detach().cpu() if torch.is_tensor(x) else x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12))


def gpu_available() -> bool:
    """A CUDA device visible to torch: then the index lives on it."""
    return torch.cuda.is_available()


class KnnIndex:
    """Exact cosine-similarity search over a fixed set of features (rows are normalised here)."""

    def __init__(self, feats: np.ndarray | torch.Tensor, use_gpu: bool | None = None) -> None:
        if use_gpu is None:
            use_gpu = gpu_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.base = torch.from_numpy(unit_rows(feats)).to(self.device)
        self.size, self.dim = self.base.shape

    def search(
        self, queries: np.ndarray | torch.Tensor, k: int, batch_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each (Q, k) best first; query chunks of at most batch_size
        rows (fewer for a large index) bound the similarity matrix held at once."""
        q = torch.from_numpy(unit_rows(queries))
        k = min(k, self.size)
        chunk = max(1, min(batch_size, CHUNK_ELEMENTS // max(self.size, 1)))
        sims = np.empty((len(q), k), dtype=np.float32)
        idx = np.empty((len(q), k), dtype=np.int64)
        for start in range(0, len(q), chunk):
            block = q[start : start + chunk].to(self.device) @ self.base.T
            s, i = block.topk(k, dim=1)
            sims[start : start + len(s)], idx[start : start + len(i)] = s.cpu(), i.cpu()
        return sims, idx


def weighted_vote(
    sims: np.ndarray,
    neighbour_labels: np.ndarray,
    num_classes: int,
    temperature: float = TEMPERATURE,
) -> np.ndarray:
    """Predicted class per query: argmax over classes of sum_j exp(s_j / T) [label_j == c]."""
    weights = torch.from_numpy(np.exp(np.asarray(sims, dtype=np.float64) / temperature))
    labels = torch.from_numpy(np.asarray(neighbour_labels, dtype=np.int64))
    scores = torch.zeros(len(weights), num_classes, dtype=torch.float64)
    scores.scatter_add_(1, labels, weights)
    return scores.argmax(dim=1).numpy()


def _drop_self(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its k+1 neighbours (or the last one if it is absent)."""
    own = idx == np.arange(len(idx))[:, None]
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return sims[keep].reshape(len(idx), -1)[:, :k], idx[keep].reshape(len(idx), -1)[:, :k]


def knn_accuracy(
    train: np.ndarray | torch.Tensor,
    train_labels: np.ndarray,
    test: np.ndarray | torch.Tensor | None,
    test_labels: np.ndarray | None,
    ks: Sequence[int] = KS,
    temperature: float = TEMPERATURE,
    use_gpu: bool | None = None,
) -> dict[int, float]:
    """Top-1 accuracy (%) of the weighted vote for each k; one search serves every k.

    With `test=None` it is leave-one-out on `train` (each query's own row is excluded).
    """
    train_labels = np.asarray(train_labels, dtype=np.int64)
    num_classes = int(train_labels.max()) + 1
    index = KnnIndex(train, use_gpu)
    loo = test is None
    queries, truth = (train, train_labels) if loo else (test, np.asarray(test_labels))
    kmax = min(max(ks), index.size - loo)
    sims, idx = index.search(queries, kmax + loo)
    if loo:
        sims, idx = _drop_self(sims, idx, kmax)
    out = {}
    for k in ks:
        kk = min(k, kmax)
        pred = weighted_vote(sims[:, :kk], train_labels[idx[:, :kk]], num_classes, temperature)
        out[int(k)] = 100.0 * float((pred == truth).sum()) / len(truth)
    return out


def self_match_rate(
    originals: np.ndarray | torch.Tensor,
    transformed: np.ndarray | torch.Tensor,
    use_gpu: bool | None = None,
) -> float:
    """How often the nearest original of transformed row i is original i itself."""
    _, idx = KnnIndex(originals, use_gpu).search(transformed, 1)
    return float((idx[:, 0] == np.arange(len(idx))).mean())


def trunk_knn(
    trunk: Trunk,
    train: ImageList,
    test: ImageList | None,
    layer: str = "res5avg",
    image_size: int = 224,
    ks: Sequence[int] = KS,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    identity: str | None = None,
    progress: bool = True,
    alone: bool = False,
) -> dict[int, float]:
    """kNN top-1 (%) per k of one layer of a trunk (which FeatureExtractor freezes: pass a copy of a
    trunk still training) on Resize + CenterCrop inputs; `test=None` is leave-one-out.
    `identity` (an `Encoder.fingerprint`) lets the features come from and go to the shared
    cache; None (a trunk still training) computes them afresh. `alone`: this process scores
    every image itself, even under torch.distributed."""
    transform = center_crop_transform(image_size)
    ext = FeatureExtractor(trunk, layer, device=device, identity=identity, alone=alone)
    feats = [
        ext.extract(
            split, transform, batch_size=batch_size, num_workers=num_workers, progress=progress
        )
        for split in (train, test)
        if split is not None
    ]
    test_feats, test_labels = (feats[1], test.labels) if test is not None else (None, None)
    return knn_accuracy(feats[0], train.labels, test_feats, test_labels, ks)
