"""Invariance analysis: distances against hand computation, view layout, CLI end to end."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from analysis.invariance import STAGES, Runtime, encoder_invariance, to_cell_order
from pirl.data import cache_dir, list_images
from pirl.features import pool_grid
from pirl.heads import PirlHeads
from pirl.invariance import BINS, JigsawPatches, invariance_distances
from pirl.jigsaw import JigsawGeometry
from pirl.jigsaw_pretext import JigsawHead, hamming_permutations
from pirl.trunk import build_trunk
from pirl_tools.main import main
from tests.conftest import write_image_folder


def test_distances_match_hand_computation() -> None:
    a = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    b = [[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]]

    def unit(v):
        n = math.hypot(*v)
        return [x / n for x in v]

    ua, ub = [unit(v) for v in a], [unit(v) for v in b]
    dist = [[math.dist(p, q) for q in ub] for p in ua]
    r = invariance_distances(np.array(a), np.array(b), "x", chunk=2)
    np.testing.assert_allclose(r.own, [0.0, math.sqrt(2), math.dist(ua[2], ub[2])])
    others = [dist[i][j] for i, j in itertools.permutations(range(3), 2)]
    assert math.isclose(r.mean_other, sum(others) / 6)
    assert math.isclose(r.ratio, r.own.mean() / (sum(others) / 6))
    # b0 and b1 are both [1, 0]: nearest original a0; b2 = [0, 1]: nearest a1 -> only row 0 hits
    assert math.isclose(r.self_match, 1 / 3)
    assert r.hist_own.sum() == 3 and r.hist_other.sum() == 6
    np.testing.assert_array_equal(r.hist_other, np.histogram(others, BINS)[0])


def test_identical_representations_are_perfectly_invariant() -> None:
    x = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))
    r = invariance_distances(x, 3 * x, "x", chunk=6)
    np.testing.assert_allclose(r.own, 0, atol=1e-7)
    assert r.self_match == 1.0 and r.mean_other > 0.5


def test_grid_pooling_and_cell_order_layout() -> None:
    x = torch.arange(2 * 36, dtype=torch.float32).reshape(1, 2, 6, 6)
    rows_cols = [(2 * (c // 3), 2 * (c % 3)) for c in range(9)]
    cells = [x[0, :, r : r + 2, c : c + 2] for r, c in rows_cols]
    expected = torch.cat([cell.mean(dim=(1, 2)) for cell in cells])
    torch.testing.assert_close(pool_grid(x, 3)[0], expected)
    torch.testing.assert_close(pool_grid(x, 1)[0], x.mean(dim=(2, 3))[0])
    # slot k holds cell perm[k]; back in cell order, cell c's vector is slot perm^-1(c)'s
    perm = torch.tensor([[2, 0, 1]])
    slots = torch.tensor([[[20.0, 21.0], [0.0, 1.0], [10.0, 11.0]]])
    assert to_cell_order(slots, perm).tolist() == [[0.0, 1.0, 10.0, 11.0, 20.0, 21.0]]


def test_patches_are_centre_crops_of_the_resized_image_in_shuffled_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    write_image_folder(tmp_path / "d", [img], np.array([0]))
    images = list_images(tmp_path / "d")
    g = JigsawGeometry.for_image_size(32)  # source 36, cells 12, patches 9: centre offset 1
    ds = JigsawPatches(images, g, seed=3)
    perm = ds.permutation(0)
    assert len(ds) == 9 and sorted(perm.tolist()) == list(range(9))
    source = Image.open(images.paths[0]).convert("RGB").resize((36, 36), Image.BILINEAR)
    src = np.asarray(source, dtype=np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for k in range(9):
        cell = int(perm[k])
        y, x = 12 * (cell // 3) + 1, 12 * (cell % 3) + 1
        ref = (src[y : y + 9, x : x + 9] - mean) / std
        got = ds[k][0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got, ref, atol=0.02)


def test_random_encoders_of_different_seeds_get_their_own_features(
    tmp_path: Path, digit_images: tuple[list[np.ndarray], np.ndarray]
) -> None:
    from pirl.weights import load_encoder

    images, labels = digit_images
    write_image_folder(tmp_path / "d", images[:6], labels[:6])
    val = list_images(tmp_path / "d")
    rt = Runtime("cpu", progress=False)
    cached = cache_dir() / "features"
    ratios = []
    for seed in (0, 1):  # the weights' seed; the patch shuffle's seed stays 0
        encoder = load_encoder("random:resnet18@0.125", seed=seed)
        ratios.append([r.ratio for r in encoder_invariance(encoder, val, 32, 0, rt)])
        assert len(list(cached.glob("*.npy"))) == 2 * len(STAGES) * (seed + 1)  # whole, patches
    assert ratios[0] != ratios[1]
    encoder = load_encoder("random:resnet18@0.125", seed=1)
    calls = []
    encoder.trunk.register_forward_hook(lambda *a: calls.append(1))
    assert [r.ratio for r in encoder_invariance(encoder, val, 32, 0, rt)] == ratios[1]
    assert len(calls) == 2  # the features from the cache: only each view's BN statistics pass


def _save_native(path: Path, trunk_seed: int, heads: torch.nn.Module | None) -> str:
    torch.manual_seed(trunk_seed)
    trunk = build_trunk("resnet18", 0.125)
    ckpt = {"trunk": trunk.state_dict(), "config": {}, "version": 1}
    if heads is not None:
        ckpt["heads"] = heads.state_dict()
    torch.save(ckpt, path)
    return str(path)


def test_cli_end_to_end_writes_tables_and_plots(
    tmp_path: Path, digit_images: tuple[list[np.ndarray], np.ndarray]
) -> None:
    images, labels = digit_images
    keep = [i for i in range(len(labels)) if labels[i] < 3][:33]
    data = tmp_path / "data"
    write_image_folder(data / "train", [images[i] for i in keep[:24]], labels[keep[:24]])
    write_image_folder(data / "val", [images[i] for i in keep[24:]], labels[keep[24:]])
    torch.manual_seed(1)
    heads = PirlHeads(64, 16, 9)
    pirl = _save_native(tmp_path / "pirl.pth", 0, heads)
    jig = _save_native(tmp_path / "jig.pth", 1, JigsawHead(64, hamming_permutations(5)))
    out = tmp_path / "out"
    args = (
        f"analyze invariance --weights pirl={pirl} --weights jigsaw={jig} "
        f"--weights floor=random:resnet18@0.125 --data {data} --out {out} --image-size 32 "
        "--device cpu --num-workers 0 --batch-size 32"
    ).split()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in ("histograms.png", "invariance_by_layer.png", "knn_by_layer.png"):
        assert (out / name).stat().st_size > 5000, name
    table = pd.read_csv(out / "invariance.csv")
    stages = ["conv1", "res2", "res3", "res4", "res5"]
    assert table["model"].tolist() == ["pirl"] * 6 + ["jigsaw"] * 5 + ["floor"] * 5
    assert table["layer"].tolist() == stages + ["f-g"] + stages * 2
    assert table["dim"].tolist()[:6] == [9 * c for c in (8, 8, 16, 32, 64)] + [16]
    assert table[["own_mean", "other_mean"]].stack().between(0, 2).all()
    np.testing.assert_allclose(table["ratio"], table["own_mean"] / table["other_mean"])
    stage_rows = table[table["layer"] != "f-g"]
    knn = stage_rows[["knn_k20", "knn_k200"]].stack()
    assert knn.between(0, 100).all() and knn.max() > 1  # percent: 9 queries, steps of 100/9
    np.testing.assert_allclose(knn * 9 / 100, (knn * 9 / 100).round(), atol=1e-9)
    assert table[table["layer"] == "f-g"][["knn_k20", "knn_k200"]].isna().all().all()
    assert "| pirl | f-g | 16 |" in (out / "invariance.md").read_text()

    # f-g row recomputed directly: the whole image at 32 px through the trunk and f, the
    # shuffled centre patches through the trunk and g, each view with BN statistics of that view
    # (the whole view in one batch: running mean and unbiased variance), unit vectors, |f - g|
    from pirl.features import resize_transform
    from pirl.weights import load_encoder

    enc = load_encoder(pirl)
    val = list_images(data / "val")
    patches = JigsawPatches(val, JigsawGeometry.for_image_size(32), seed=0)
    tf = resize_transform(32)

    def pooled(x: torch.Tensor) -> torch.Tensor:
        trunk = copy.deepcopy(enc.trunk)
        bns = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        stats = {}

        def keep(module, inputs, output):
            y = inputs[0]
            n = y.numel() / y.shape[1]
            stats[module] = (y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False) * n / (n - 1))

        handles = [m.register_forward_hook(keep) for m in bns]
        trunk.train()
        trunk.pooled(x)  # batch statistics layer by layer
        for h in handles:
            h.remove()
        for m in bns:
            m.running_mean, m.running_var = stats[m]
        return trunk.eval().pooled(x)

    with torch.no_grad():
        whole = torch.stack([tf(Image.open(p).convert("RGB")) for p in val.paths])
        f = enc.heads.f(pooled(whole))
        g = enc.heads.g(pooled(torch.stack([patches[i][0] for i in range(len(patches))])))
    own = (F.normalize(f, dim=1) - F.normalize(g, dim=1)).norm(dim=1).mean().item()
    got = table[(table["model"] == "pirl") & (table["layer"] == "f-g")]["own_mean"].item()
    assert math.isclose(got, own, rel_tol=1e-4), (got, own)


def test_cli_needs_weights_with_data(tmp_path: Path, tiny_folder: Path) -> None:
    result = CliRunner().invoke(main, ["analyze", "invariance", "--data", str(tiny_folder)])
    assert result.exit_code == 2
    assert "pass --weights NAME=PATH" in result.output
