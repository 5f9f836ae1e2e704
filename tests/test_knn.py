"""faiss kNN: neighbours equal scikit-learn's brute force; votes equal a hand computation."""

from __future__ import annotations

import math

import numpy as np
from sklearn.neighbors import NearestNeighbors

from pirl.knn import KnnIndex, knn_accuracy, self_match_rate, unit_rows, weighted_vote


def test_neighbours_equal_sklearn_brute_force_cosine() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(500, 32)) * rng.uniform(0.5, 3, size=(500, 1))
    queries = rng.normal(size=(70, 32))
    sims, idx = KnnIndex(base, use_gpu=False).search(queries, 15, batch_size=16)
    nn = NearestNeighbors(n_neighbors=15, metric="cosine", algorithm="brute").fit(base)
    dist, ref = nn.kneighbors(queries)
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(sims, 1 - dist, atol=1e-5)


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
    assert acc == {1: 0.75, 3: 0.75, 200: 0.75}
    # with k = 200 (all six) the weighted vote still follows the nearer cluster
    loo = knn_accuracy(train, labels, None, None, ks=(2, 200), use_gpu=False)
    assert loo == {2: 1.0, 200: 1.0}


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
