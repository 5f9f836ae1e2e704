"""Jigsaw pretext: the maximal-Hamming permutation set, the classifier, and `--method jigsaw`."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pirl.jigsaw import JigsawGeometry, unshuffle
from pirl.jigsaw_pretext import (
    JigsawHead,
    JigsawLoss,
    JigsawModel,
    JigsawTransform,
    hamming_permutations,
    min_hamming_distance,
)
from pirl.safe_load import read_checkpoint
from pirl.trunk import build_trunk
from pirl.weights import load_encoder
from pirl_tools.main import main


def test_default_set_is_vissls_size_and_1000_keep_every_pair_5_apart() -> None:
    assert hamming_permutations().shape == (2000, 9)  # VISSL's perm2000
    perms = hamming_permutations(1000)
    assert len({tuple(p) for p in perms.tolist()}) == 1000
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    assert torch.equal(perms, hamming_permutations(1000, 9, 0))
    # brute force over all 499,500 pairs: max-min keeps every pair at least 5 apart
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    assert int(d[~torch.eye(1000, dtype=torch.bool)].min()) == 5
    assert not torch.equal(hamming_permutations(10, 9, 0), hamming_permutations(10, 9, 1))


def test_small_sets_reach_the_hand_checked_distances() -> None:
    # 3 patches: the three cyclic shifts differ everywhere, so greedy finds distance 3; any
    # fourth permutation of 3 items agrees with one of them somewhere (a transposition fixes
    # one point), so distance 2 from then on.
    three = hamming_permutations(3, 3, seed=0)
    assert min_hamming_distance(three) == 3
    assert min_hamming_distance(hamming_permutations(4, 3, seed=0)) == 2
    # two permutations of 9: the second is a derangement relative to the first
    two = hamming_permutations(2, 9, seed=0)
    assert min_hamming_distance(two) == 9
    # after a seeded start, greedy on 4 patches equals a plain itertools search
    perms = [tuple(p) for p in itertools.permutations(range(4))]
    start = int(np.random.default_rng(5).integers(len(perms)))
    chosen = [perms[start]]
    for _ in range(7):
        score = [min(sum(a != b for a, b in zip(p, q, strict=True)) for q in chosen) for p in perms]
        chosen.append(perms[score.index(max(score))])
    assert hamming_permutations(8, 4, seed=5).tolist() == [list(p) for p in chosen]


def test_more_permutations_than_exist_is_refused() -> None:
    with pytest.raises(ValueError, match="choose 1..6"):
        hamming_permutations(7, 3)


def test_transform_shuffles_by_the_recorded_class() -> None:
    perms = hamming_permutations(20)
    geometry = JigsawGeometry.for_image_size(32)
    from PIL import Image

    # a horizontal ramp: every cell has its own mean after unshuffling, whatever the jitter
    ramp = np.tile(np.arange(geometry.source_size, dtype=np.uint8)[None, :, None], (40, 1, 3))
    img = Image.fromarray(np.ascontiguousarray(ramp.transpose(1, 0, 2))).resize((64, 64))
    transform = JigsawTransform(geometry, perms)
    size = (geometry.source_size,) * 2
    transform.source = lambda x: torch.from_numpy(
        np.asarray(x.resize(size), np.float32).copy()
    ).permute(2, 0, 1)
    torch.manual_seed(0)
    image, patches, label = transform(img)
    assert image.numel() == 0 and patches.shape[0] == 9 and 0 <= int(label) < 20
    rows = unshuffle(patches, perms[label]).mean(dim=(1, 2, 3)).reshape(3, 3)
    assert torch.all(rows[1:] > rows[:-1])  # cells in row-major order go down the ramp


def test_transform_is_vissls_jigsaw_augmentation() -> None:
    """Grayscale decided once per image with p 0.66 (PIRL's views: 0.2 per patch), no colour
    jitter: a patch's pixels are the normalised source's, so a colour pixel keeps its colour."""
    from PIL import Image

    from pirl.jigsaw import IMAGENET_MEAN, IMAGENET_STD

    geometry = JigsawGeometry.for_image_size(32)
    transform = JigsawTransform(geometry, hamming_permutations(20))
    img = Image.new("RGB", (48, 40), (200, 40, 90))
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    colour = ((torch.tensor([200, 40, 90]) / 255 - mean) / std).view(1, 3, 1, 1)
    torch.manual_seed(0)
    gray = []
    for _ in range(300):
        _, patches, _ = transform(img)
        rgb = patches * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
        is_gray = (rgb.amax(1) - rgb.amin(1)).amax(dim=(1, 2)) < 1e-3  # per patch
        assert is_gray.all() or not is_gray.any()  # one decision for the whole image
        if not is_gray.any():
            torch.testing.assert_close(patches, colour.expand_as(patches), atol=1e-5, rtol=0)
        gray.append(bool(is_gray.all()))
    assert 0.58 < np.mean(gray) < 0.74  # 0.66 +- 3 standard deviations of 300 draws


def test_model_shapes_and_loss_decreases() -> None:
    torch.manual_seed(0)
    perms = hamming_permutations(8)
    trunk = build_trunk("resnet18", 0.125)
    model = JigsawModel(trunk, JigsawHead(trunk.out_dim, perms))
    patches = torch.randn(4, 9, 3, 12, 12)
    target = torch.tensor([0, 3, 5, 7])
    logits = model(patches)
    assert logits.shape == (4, 8)
    loss = JigsawLoss()
    assert torch.isclose(loss(logits, target), -logits.log_softmax(1)[range(4), target].mean())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = None
    for _ in range(6):
        value = loss(model(patches), target)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < first - 0.1, (first, value.item())


def test_pretrain_method_jigsaw_writes_a_checkpoint_load_encoder_reads(
    tiny_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "jig"
    args = (
        f"pretrain --method jigsaw --data {tiny_folder} --out {out} --arch resnet18 --width 0.125 "
        "--image-size 32 --epochs 1 --batch-size 16 --num-permutations 10 --num-workers 0 "
        "--device cpu"
    ).split()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    ckpt = read_checkpoint(out / "checkpoint.pth")
    assert ckpt["config"]["method"] == "jigsaw" and ckpt["memory"] is None
    mlp = {f"patch.0.{k}" for k in ("weight", "bias")} | {
        f"patch.1.{k}" for k in ("weight", "bias", "running_mean", "running_var")
    }
    assert set(ckpt["heads"]) == {
        "permutations",
        "classifier.weight",
        "classifier.bias",
        "patch.1.num_batches_tracked",
        *mlp,
    }
    assert torch.equal(ckpt["heads"]["permutations"], hamming_permutations(10))
    assert ckpt["heads"]["patch.0.weight"].shape == (1000, 64)
    assert ckpt["heads"]["classifier.weight"].shape == (10, 9 * 1000)
    enc = load_encoder(out / "checkpoint.pth")
    assert enc.heads is None and enc.arch == "resnet18" and enc.width == 0.125
    for k, v in enc.trunk.state_dict().items():
        assert torch.equal(v, ckpt["trunk"][k]), k


def test_step_schedule_is_vissls_jigsaw_schedule() -> None:
    """VISSL's bs32_4nodes Jigsaw schedule (batch 1024): linear 0.1 -> 0.4 over 5 of 105 epochs,
    then 0.4, 0.04, 0.004, 0.0004, 0.00004 from epochs 30, 60, 90, 100."""
    from pirl.pretrain import step_lr

    expected = {0: 0.1, 2.5: 0.25, 5: 0.4, 29: 0.4, 30: 0.04, 59: 0.04, 60: 0.004, 90: 4e-4}
    expected |= {99: 4e-4, 100: 4e-5, 104: 4e-5}
    for epoch, lr in expected.items():
        assert step_lr(epoch / 105, 0.4) == pytest.approx(lr, rel=1e-9), epoch


def test_jigsaw_defaults_are_vissls_and_pirls_augmentation_flags_are_refused(
    tiny_folder: Path,
) -> None:
    from pirl.errors import UserError
    from pirl.pretrain import PretrainConfig

    cfg = PretrainConfig(data=str(tiny_folder), method="jigsaw").resolved()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_schedule) == (105, 256, 0.1, "steps")
    assert cfg.num_permutations == 2000 and cfg.hue is None and cfg.crop_scale is None
    embedded = PretrainConfig(method="jigsaw").resolved()
    assert (embedded.batch_size, embedded.lr, embedded.lr_schedule) == (64, 0.025, "steps")
    assert PretrainConfig(method="pirl").resolved().lr_schedule == "cosine"
    for flag in ("hue", "photometric", "crop_scale"):
        with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} 0.3: the Jigsaw"):
            PretrainConfig(method="jigsaw", **{flag: 0.3}).resolved()
    result = CliRunner().invoke(main, ["pretrain", "--method", "jigsaw", "--hue", "0.1"])
    assert result.exit_code == 2 and "error: --hue 0.1: the Jigsaw baseline" in result.output
