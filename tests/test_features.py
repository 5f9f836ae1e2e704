import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pirl.data import ImageDataset, embedded_images, list_images
from pirl.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureExtractor,
    cache_key,
    dataset_fingerprint,
    feature_channels,
    feature_dim,
    pool_stage,
    resize_transform,
    weights_fingerprint,
)
from pirl.trunk import build_trunk

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


def test_extract_matches_direct_forward_and_cache_skips_the_trunk(tmp_path):
    torch.manual_seed(0)
    trunk = build_trunk("resnet18", 0.125)
    images = _image_set(tmp_path)
    tf = resize_transform(32)
    ds = ImageDataset(images, tf)
    ext = FeatureExtractor(trunk, "res4", device="cpu")
    calls = []
    trunk.register_forward_hook(lambda *a: calls.append(1))
    key = cache_key(
        weights_fingerprint("random:resnet18@0.125"), "res4", dataset_fingerprint(images.paths), tf
    )
    first = ext.extract(ds, key=key, batch_size=5, dtype="float32", progress=False)
    assert len(calls) == 3  # 12 images in batches of 5
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        want = torch.nn.functional.adaptive_avg_pool2d(trunk(x, ("res4",))["res4"], 3).flatten(1)
    np.testing.assert_allclose(first, want.numpy(), rtol=1e-4, atol=1e-5)
    calls.clear()
    again = ext.extract(ds, key=key, batch_size=5, dtype="float32", progress=False)
    assert not calls  # served from the cache
    np.testing.assert_array_equal(again, first)
    assert isinstance(again, np.memmap)


def test_cache_key_changes_with_each_part(tmp_path):
    w = tmp_path / "w.pth"
    w.write_bytes(b"abc")
    base = dict(weights=weights_fingerprint(w), layer="res5", dataset="d", transform="t")
    keys = {cache_key(**base)}
    for k, v in [("layer", "res4"), ("dataset", "e"), ("transform", "u")]:
        keys.add(cache_key(**{**base, k: v}))
    w.write_bytes(b"abcd")
    keys.add(cache_key(**{**base, "weights": weights_fingerprint(w)}))
    assert len(keys) == 5


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
    key = dict(weights="w", layer="res5", dataset="d")
    assert cache_key(**key, transform=resize_transform(224)) != cache_key(**key, transform=one)
