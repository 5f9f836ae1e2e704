"""Torch kNN search: neighbours equal scikit-learn's brute force and faiss's IndexFlatIP (the
search it replaced); votes equal a hand computation; accuracies in percent."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from analysis.knn import encoder_knn
from pirl.data import cache_dir, list_images
from pirl.knn import KnnIndex, knn_accuracy, self_match_rate, unit_rows, weighted_vote
from pirl.weights import load_encoder
from tests.conftest import write_image_folder


def test_neighbours_equal_sklearn_brute_force_cosine() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(500, 32)) * rng.uniform(0.5, 3, size=(500, 1))
    queries = rng.normal(size=(70, 32))
    sims, idx = KnnIndex(base, use_gpu=False).search(queries, 15, batch_size=16)
    nn = NearestNeighbors(n_neighbors=15, metric="cosine", algorithm="brute").fit(base)
    dist, ref = nn.kneighbors(queries)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(sims, 1 - dist, atol=1e-5)


def test_search_equals_faiss_flat_ip_and_gives_the_same_accuracies() -> None:
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    protos = rng.normal(size=(10, 64))
    ytr, yq = rng.integers(0, 10, 3000), rng.integers(0, 10, 400)
    train = np.maximum(0, protos[ytr] + 2 * rng.normal(size=(3000, 64))).astype(np.float32)
    queries = np.maximum(0, protos[yq] + 2 * rng.normal(size=(400, 64))).astype(np.float32)
    flat = faiss.IndexFlatIP(64)
    flat.add(unit_rows(train))
    ref_sims, ref_idx = flat.search(unit_rows(queries), 200)
    sims, idx = KnnIndex(train, use_gpu=False).search(queries, 200, batch_size=64)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)
    swapped = idx != ref_idx  # only neighbours whose similarities tie to float32 precision
    assert swapped.mean() < 0.01
    np.testing.assert_allclose(sims[swapped], ref_sims[swapped], atol=1e-6)
    for k in (20, 200):
        ours = weighted_vote(sims[:, :k], ytr[idx[:, :k]], 10)
        np.testing.assert_array_equal(ours, weighted_vote(ref_sims[:, :k], ytr[ref_idx[:, :k]], 10))
    acc = knn_accuracy(train, ytr, queries, yq, use_gpu=False)
    by_hand = {
        k: 100 * float((weighted_vote(ref_sims[:, :k], ytr[ref_idx[:, :k]], 10) == yq).mean())
        for k in (20, 200)
    }
    assert acc == pytest.approx(by_hand, abs=1e-9)


def test_large_index_searches_in_bounded_chunks(monkeypatch) -> None:
    import pirl.knn

    monkeypatch.setattr(pirl.knn, "CHUNK_ELEMENTS", 1000)  # 200-row index: 5 queries a chunk
    rng = np.random.default_rng(2)
    base, queries = rng.normal(size=(200, 8)), rng.normal(size=(23, 8))
    sims, idx = KnnIndex(base, use_gpu=False).search(queries, 7)
    exact = unit_rows(queries).astype(np.float64) @ unit_rows(base).T.astype(np.float64)
    np.testing.assert_array_equal(idx, np.argsort(-exact, axis=1)[:, :7])


def test_k_larger_than_index_is_clipped() -> None:
    sims, idx = KnnIndex(np.eye(3), use_gpu=False).search(np.eye(3), 10)
    assert idx.shape == (3, 3)
    np.testing.assert_array_equal(idx[:, 0], [0, 1, 2])


def test_weighted_vote_matches_hand_computation() -> None:
    # query 0: class 1 has one close neighbour (0.9); class 0 two far ones (0.5, 0.45).
    # exp(0.9/.07) = 3.84e5 > exp(0.5/.07) + exp(0.45/.07) = 1265 + 620: class 1 wins,
    # although a majority vote would pick class 0.
    sims = np.array([[0.9, 0.5, 0.45], [0.30, 0.29, 0.28]])
    labels = np.array([[1, 0, 0], [2, 0, 0]])
    assert math.exp(0.9 / 0.07) > math.exp(0.5 / 0.07) + math.exp(0.45 / 0.07)
    # query 1: class 0 gets exp(.29/.07) + exp(.28/.07) > exp(.30/.07) for class 2
    np.testing.assert_array_equal(weighted_vote(sims, labels, 3), [1, 0])
    # a huge temperature makes it a majority vote
    np.testing.assert_array_equal(weighted_vote(sims, labels, 3, temperature=1e6), [0, 0])


def test_knn_accuracy_against_hand_built_clusters() -> None:
    # two tight clusters on opposite axes plus one test point on the wrong side
    train = np.array([[1, 0.01], [1, -0.02], [1, 0.03], [-1, 0.01], [-1, 0.02], [-1, -0.01]])
    labels = np.array([0, 0, 0, 1, 1, 1])
    test = np.array([[2.0, 0.1], [-3.0, 0.0], [-1.0, 0.2], [1.0, 1.0]])
    truth = np.array([0, 1, 0, 0])
    acc = knn_accuracy(train, labels, test, truth, ks=(1, 3, 200), use_gpu=False)
    assert acc == {1: 75.0, 3: 75.0, 200: 75.0}
    # with k = 200 (all six) the weighted vote still follows the nearer cluster
    loo = knn_accuracy(train, labels, None, None, ks=(2, 200), use_gpu=False)
    assert loo == {2: 100.0, 200: 100.0}


def test_leave_one_out_excludes_the_query_itself() -> None:
    # each point's only same-label partner is far; its own row would make k=1 perfect
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.98, 0.2], [0.2, 0.98]])
    labels = np.array([0, 1, 1, 0])
    assert knn_accuracy(train, labels, None, None, ks=(1,), use_gpu=False) == {1: 0.0}


def test_self_match_rate_counts_own_nearest_original() -> None:
    orig = unit_rows(np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]]))
    moved = orig.copy()
    moved[1] = [0.9, 0.1, 0]  # now nearest to row 0
    assert self_match_rate(orig, moved, use_gpu=False) == 0.75


def _cached_files() -> list[Path]:
    return sorted((cache_dir() / "features").glob("*.npy"))


def _train_val(root: Path, digit_images: tuple[list[np.ndarray], np.ndarray]) -> Path:
    """An ImageFolder train/ and val/ of 3 classes: both the linear probe and kNN read it."""
    images, labels = digit_images
    keep = [i for i in range(len(labels)) if labels[i] < 3][:24]
    write_image_folder(root / "train", [images[i] for i in keep[:16]], labels[keep[:16]])
    write_image_folder(root / "val", [images[i] for i in keep[16:]], labels[keep[16:]])
    return root


def test_linear_probe_and_analysis_share_one_cache_entry(
    tmp_path: Path, digit_images: tuple[list[np.ndarray], np.ndarray]
) -> None:
    from transfer.linear_probe import run_linear

    data = _train_val(tmp_path / "data", digit_images)
    spec = "random:resnet18@0.125"
    kw = dict(device="cpu", num_workers=0, image_size=32, augment=False, epochs=1, seed=3)
    run_linear(spec, "imagenet", data, "res5", **kw)
    written = _cached_files()
    assert len(written) == 2  # train and val, centre-crop res5 features
    encoder = load_encoder(spec, seed=3)
    calls = []
    encoder.trunk.register_forward_hook(lambda *a: calls.append(1))
    train, val = list_images(data / "train"), list_images(data / "val")
    encoder_knn(encoder, train, val, ["res5"], 32, (3,), "cpu", progress=False)
    assert not calls  # both splits served from the probe's entries
    assert _cached_files() == written


def test_random_encoders_of_different_seeds_do_not_share_features(
    tmp_path: Path, digit_images: tuple[list[np.ndarray], np.ndarray]
) -> None:
    data = _train_val(tmp_path / "data", digit_images)
    train = list_images(data / "train")
    for seed in (0, 1):
        encoder = load_encoder("random:resnet18@0.125", seed=seed)
        encoder_knn(encoder, train, None, ["res4"], 32, (3,), "cpu", progress=False)
        assert len(_cached_files()) == seed + 1  # leave-one-out: one entry per seed
    first, second = (np.load(p) for p in _cached_files())
    assert first.shape == second.shape and not np.array_equal(first, second)


def _knn_by_hand(xtr, ytr, xte, yte, k) -> float:
    """scikit-learn's brute-force cosine neighbours and NPID's exp(s / 0.07) votes, in %."""
    dist, idx = NearestNeighbors(n_neighbors=k, metric="cosine").fit(xtr).kneighbors(xte)
    votes = np.zeros((len(xte), ytr.max() + 1))
    np.add.at(votes, (np.arange(len(xte))[:, None], ytr[idx]), np.exp((1 - dist) / 0.07))
    return 100 * float((votes.argmax(1) == yte).mean())


def test_transfer_knn_command_reports_percent_per_layer_and_k(
    tmp_path: Path, digit_images: tuple[list[np.ndarray], np.ndarray]
) -> None:
    import json

    from click.testing import CliRunner

    from pirl.features import FeatureExtractor, center_crop_transform
    from pirl_tools.main import main

    data = _train_val(tmp_path / "data", digit_images)
    out = tmp_path / "knn"
    args = (
        f"transfer knn --weights rnd=random:resnet18@0.125 --data {data} --layer res4,res5avg "
        f"--k 3 --k 5 --image-size 32 --device cpu --num-workers 0 --seed 1 --out {out}"
    ).split()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "rnd: kNN top-1 % at res5avg  k=3:" in result.output
    res = json.loads((out / "results.json").read_text())
    assert res["ks"] == [3, 5] and set(res["layers"]) == {"res4", "res5avg"}
    enc = load_encoder("random:resnet18@0.125", seed=1)
    train, val = list_images(data / "train"), list_images(data / "val")
    for layer in ("res4", "res5avg"):
        ext = FeatureExtractor.for_encoder(enc, layer, device="cpu")
        xtr, xte = (
            np.asarray(ext.extract(s, center_crop_transform(32), progress=False), np.float64)
            for s in (train, val)
        )
        for k in (3, 5):
            want = _knn_by_hand(xtr, np.array(train.labels), xte, np.array(val.labels), k)
            assert res["layers"][layer][f"top1_k{k}"] == pytest.approx(want)
    assert (out / "knn.md").read_text().startswith("| model | layer | knn_k3 | knn_k5 |")
    bad = CliRunner().invoke(
        main, ["transfer", "knn", "--weights", "random", "--benchmark", "voc07"]
    )
    assert bad.exit_code == 2 and "voc07" in bad.output
