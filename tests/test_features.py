import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pirl.data import ImageDataset, cache_dir, embedded_images, list_images
from pirl.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureExtractor,
    center_crop_transform,
    feature_channels,
    feature_dim,
    pool_stage,
    resize_transform,
)
from pirl.trunk import build_trunk
from pirl.weights import load_encoder

# Published dims for ResNet-50 at 224 (docs/reference.md).
R50_DIMS = {"conv1": 9216, "res2": 9216, "res3": 8192, "res4": 9216, "res5": 8192, "res5avg": 2048}
# in_channels of VISSL's eval_mlp heads (eval_resnet_8gpu_transfer_in1k_linear.yaml).
R50_CHANNELS = {"conv1": 64, "res2": 256, "res3": 512, "res4": 1024, "res5": 2048, "res5avg": 2048}


def _out_side(n, k, s, p):
    return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("layer", list(R50_DIMS))
def test_resnet50_pooled_dims_match_the_benchmark(layer):
    with torch.device("meta"):
        trunk = build_trunk("resnet50")
    assert feature_dim(trunk, layer) == R50_DIMS[layer]
    assert feature_channels(trunk, layer) == R50_CHANNELS[layer]
    # Shapes without compute: the stage maps of ResNet-50 at 224 on the meta device.
    side = {"conv1": 112, "res2": 56, "res3": 28, "res4": 14, "res5": 7, "res5avg": 7}[layer]
    stage = "res5" if layer == "res5avg" else layer
    x = torch.empty(2, trunk.channels[stage], side, side, device="meta")
    assert pool_stage(x, layer).shape == (2, R50_DIMS[layer])


def test_published_pooling_is_used_at_224_and_grid_kept_elsewhere():
    # conv1 at 224: k10 s10 p4 with zero padding counted, checked against a hand loop; the row
    # is the (channels, 12, 12) map flattened channel-major, as the linear probe reads it.
    x = torch.rand(1, 2, 112, 112)
    got = pool_stage(x, "conv1").reshape(2, 12, 12)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))[0]
    assert _out_side(112, 10, 10, 4) == 12
    for i, j in [(0, 0), (5, 7), (11, 11)]:
        want = padded[:, 10 * i : 10 * i + 10, 10 * j : 10 * j + 10].mean(dim=(1, 2))
        torch.testing.assert_close(got[:, i, j], want)
    # Another input size: same 12x12 grid, so the same length.
    assert pool_stage(torch.rand(1, 2, 32, 32), "conv1").shape == (1, 2 * 144)
    torch.testing.assert_close(pool_stage(x, "res5avg"), x.mean(dim=(2, 3)))


def _image_set(tmp_path, n=12):
    images, labels = embedded_images(32)
    for i in range(n):
        d = tmp_path / "imgs" / f"c{labels[i]}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(d / f"{i:03d}.png")
    return list_images(tmp_path / "imgs")


def _cached_files():
    return sorted((cache_dir() / "features").glob("*.npy"))


def _counting(encoder):
    calls = []
    encoder.trunk.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_extract_matches_direct_forward_and_cache_skips_the_trunk(tmp_path):
    enc = load_encoder("random:resnet18@0.125", seed=0)
    images = _image_set(tmp_path)
    tf = resize_transform(32)
    ext = FeatureExtractor.for_encoder(enc, "res4", device="cpu")
    calls = _counting(enc)
    first = ext.extract(images, tf, batch_size=5, dtype="float32", progress=False)
    assert len(calls) == 3  # 12 images in batches of 5
    ds = ImageDataset(images, tf)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        res4 = enc.trunk(x, ("res4",))["res4"]
    want = torch.nn.functional.adaptive_avg_pool2d(res4, 3).flatten(1)
    np.testing.assert_allclose(first, want.numpy(), rtol=1e-4, atol=1e-5)
    calls.clear()
    again = ext.extract(images, tf, batch_size=5, dtype="float32", progress=False)
    assert not calls  # served from the cache
    np.testing.assert_array_equal(again, first)
    assert isinstance(again, np.memmap)
    assert len(_cached_files()) == 1


def test_a_trunk_without_identity_is_never_cached(tmp_path):
    trunk = build_trunk("resnet18", 0.125)
    ext = FeatureExtractor(trunk, "res5avg", device="cpu")
    feats = ext.extract(_image_set(tmp_path, 4), resize_transform(32), progress=False)
    assert feats.shape == (4, 64) and not _cached_files()


def test_a_different_layer_grid_view_or_dtype_misses(tmp_path):
    enc = load_encoder("random:resnet18@0.125", seed=0)
    images = _image_set(tmp_path, 4)
    tf = resize_transform(32)
    calls = _counting(enc)

    def extract(layer="res4", grid=None, view=tf, dtype="float16"):
        calls.clear()
        ext = FeatureExtractor.for_encoder(enc, layer, device="cpu", grid=grid)
        feats = ext.extract(images, view, dtype=dtype, progress=False)
        assert calls, (layer, grid, view, dtype)  # the trunk ran: a miss
        return feats

    base = extract()
    extract(layer="res3")
    extract(layer="res4", grid=3)  # same length as the benchmark pooling, other layout
    assert not np.array_equal(extract(view=center_crop_transform(32)), base)
    extract(dtype="float32")
    assert len(_cached_files()) == 5


def test_a_rewritten_weights_file_misses_even_under_a_home_relative_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "w.pth"
    images = _image_set(tmp_path, 4)
    tf = resize_transform(32)

    def save(seed):
        torch.manual_seed(seed)
        torch.save({"trunk": build_trunk("resnet18", 0.125).state_dict()}, path)

    def extract():
        enc = load_encoder("~/w.pth")
        calls = _counting(enc)
        ext = FeatureExtractor.for_encoder(enc, "res5avg", device="cpu")
        return ext.extract(images, tf, progress=False), len(calls)

    save(0)
    first, ran = extract()
    assert ran and extract()[1] == 0  # the same file hits
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    save(1)  # same architecture: same size; make sure the clock moved too
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))
    assert path.stat().st_size == size
    second, ran = extract()
    assert ran and not np.array_equal(first, second)
    assert len(_cached_files()) == 2


def test_a_data_set_view_must_be_built_over_the_images_asked_for(tmp_path):
    enc = load_encoder("random:resnet18@0.125", seed=0)
    images = _image_set(tmp_path, 4)
    other = ImageDataset(_image_set(tmp_path / "b", 4), resize_transform(32))
    with pytest.raises(ValueError, match="built over the images"):
        FeatureExtractor.for_encoder(enc, device="cpu").extract(images, other)


def test_voc07_input_is_vissls_two_resizes_not_one():
    # VISSL benchmark/linear_image_classification/voc07/eval_resnet_8gpu_transfer_voc07_svm
    # .yaml: Resize 256 (shorter side), Resize [224, 224], ToTensor, Normalize. On a 300x500
    # image of fine stripes the first resize blurs what a single squash would alias.
    rng = np.random.default_rng(0)
    stripes = (np.arange(300)[None, :, None] % 3 == 0) * 200 + rng.integers(0, 50, (500, 300, 3))
    img = Image.fromarray(stripes.astype(np.uint8))  # width 300, height 500
    got = resize_transform(224)(img)
    by_hand = img.resize((256, 426), Image.BILINEAR).resize((224, 224), Image.BILINEAR)
    mean, std = (
        torch.tensor(v)[:, None, None] for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )
    want = (torch.from_numpy(np.asarray(by_hand, np.float32) / 255).permute(2, 0, 1) - mean) / std
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    one = T.Compose([T.Resize((224, 224)), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert (got - one(img)).abs().max() > 0.5
    # The cached features of the old single-resize input are not served for the new one.
    assert repr(resize_transform(224)) != repr(one)


def test_several_layers_come_from_one_pass_and_equal_each_layer_alone(tmp_path):
    images = _image_set(tmp_path, 12)
    tf = center_crop_transform(32)
    layers = ["conv1", "res3", "res5", "res5avg"]
    enc = load_encoder("random:resnet18@0.125", seed=4)
    calls = _counting(enc)
    ext = FeatureExtractor.for_encoder(enc, "res5", device="cpu")
    together = ext.extract_layers(images, tf, layers, batch_size=5, progress=False)
    assert len(calls) == 3  # 12 images in batches of 5: one trunk forward per batch in all
    assert len(_cached_files()) == 4  # one entry per layer, keyed as if extracted alone
    for layer in layers:  # cache hits now; recompute alone, uncached, and compare
        hit = FeatureExtractor.for_encoder(enc, layer, device="cpu").extract(
            images, tf, batch_size=5, progress=False
        )
        alone = FeatureExtractor(enc.trunk, layer, device="cpu").extract(
            images, tf, batch_size=5, progress=False
        )
        np.testing.assert_array_equal(together[layer], hit)
        np.testing.assert_array_equal(together[layer], alone)
    assert len(calls) == 3 + 4 * 3  # the hits ran nothing; the uncached runs 3 batches each


@pytest.mark.parametrize("dtype, amp", [("float16", True), ("float32", False)])
def test_float32_features_are_computed_in_float32_too(monkeypatch, dtype: str, amp: bool) -> None:
    """--feature-dtype float32 means the reference's features: no float16 autocast on a GPU
    either (the CPU never autocasts, so the request itself is what is checked)."""
    import transfer.linear_probe as lp

    asked = {}

    class Stop(Exception):
        pass

    def for_encoder(encoder, layer, device, amp=True):
        asked["amp"] = amp
        raise Stop

    monkeypatch.setattr(lp.FeatureExtractor, "for_encoder", for_encoder)
    with pytest.raises(Stop):
        lp.run_linear("random:resnet18@0.125", "imagenet", None, "res5", device="cpu",
                      feature_dtype=dtype, image_size=32)  # fmt: skip
    assert asked["amp"] is amp
