"""The workers' JPEG decoding (pirl/decode.py, CropTransform) against PIL: header sizes on
JPEGs of many kinds, libjpeg-turbo's pixels, the reduced (DCT-domain) decode within the resize
tolerance, the same boxes as the old path, and bad files as the same one-line errors."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torchvision.transforms import functional as TF

from pirl import augment as A
from pirl.data import ImageDataset, ImageList, load_image
from pirl.decode import EncodedImage, decode_full, jpeg_header, reduction
from pirl.errors import UserError
from pirl.jigsaw import JigsawGeometry
from tests.conftest import encoded_and_cropped


def photo(name: str = "astronaut", size: tuple[int, int] | None = None) -> Image.Image:
    img = Image.fromarray(getattr(skdata, name)())
    return img.resize(size, Image.BILINEAR) if size else img


def jpeg(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def with_thumbnail(data: bytes) -> bytes:
    """An APP1 segment holding a whole 40x30 JPEG (as an EXIF thumbnail is), after SOI."""
    thumb = jpeg(photo("coffee", (40, 30)))
    body = b"Exif\x00\x00" + thumb
    return data[:2] + b"\xff\xe1" + (len(body) + 2).to_bytes(2, "big") + body + data[2:]


def kinds() -> dict[str, bytes]:
    rgb = photo("chelsea", (501, 377))  # odd sizes: partial blocks at the edges
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return {
        "baseline": jpeg(rgb, quality=90),
        "baseline-444": jpeg(rgb, quality=95, subsampling=0),
        "progressive": jpeg(rgb, progressive=True),
        "grayscale": jpeg(photo("camera")),
        "cmyk": jpeg(rgb.convert("CMYK")),
        "exif-rotated": jpeg(rgb, exif=exif.tobytes()),
        "restart-markers": jpeg(rgb, restart_marker_blocks=4),
        "thumbnail-in-app1": with_thumbnail(jpeg(rgb)),
        "tiny": jpeg(photo("rocket", (7, 5))),
    }


@pytest.mark.parametrize("kind", list(kinds()))
def test_header_size_equals_pils(kind: str) -> None:
    """The byte-level SOF reader against PIL's size; EXIF orientation is not applied by
    either (the stored frame: a rotated photo stays as stored, as torchvision and VISSL)."""
    data = kinds()[kind]
    header = jpeg_header(data)
    with Image.open(io.BytesIO(data)) as img:
        assert header is not None and (header.width, header.height) == img.size
        assert header.components == len(img.getbands())
        assert header.sequential_8bit != bool(img.info.get("progressive"))


def test_header_tells_which_frames_nvjpeg_batches() -> None:
    """8-bit sequential Huffman frames (SOF0, SOF1) go to the GPU; a progressive frame, an
    arithmetic-coded one (SOF9) and a 12-bit one stay with the worker. The last two are the
    baseline file with its frame marker or sample precision byte changed: PIL writes neither."""
    data = kinds()["baseline"]
    sof = data.index(b"\xff\xc0")
    arithmetic = data[: sof + 1] + b"\xc9" + data[sof + 2 :]
    extended = data[: sof + 1] + b"\xc1" + data[sof + 2 :]
    twelve_bit = data[: sof + 4] + b"\x0c" + data[sof + 5 :]
    got = {
        name: jpeg_header(d).sequential_8bit
        for name, d in [
            ("baseline", data),
            ("extended", extended),
            ("progressive", kinds()["progressive"]),
            ("arithmetic", arithmetic),
            ("12-bit", twelve_bit),
        ]
    }
    assert got == {
        "baseline": True,
        "extended": True,
        "progressive": False,
        "arithmetic": False,
        "12-bit": False,
    }


def test_header_refuses_what_is_not_a_jpeg() -> None:
    png = io.BytesIO()
    photo("coffee", (20, 10)).save(png, "PNG")
    good = kinds()["baseline"]
    for data in (b"", b"\xff\xd8", png.getvalue(), good[:20], b"\xff\xd8\xff\xda" + good[4:]):
        assert jpeg_header(data) is None


@pytest.mark.parametrize("kind", ["baseline", "baseline-444", "progressive", "grayscale"])
def test_full_decode_is_pils_pixels(kind: str) -> None:
    """libjpeg-turbo through torchvision against load_image (PIL): measured identical on every
    kind here (both are libjpeg-turbo with its default IDCT and fancy upsampling)."""
    data = kinds()[kind]
    got = decode_full(bytearray(data), jpeg_header(data))
    want = TF.pil_to_tensor(load_image(io.BytesIO(data)))
    assert got is not None and torch.equal(got, want)


def test_cmyk_is_left_to_pil() -> None:
    data = kinds()["cmyk"]
    assert decode_full(data, jpeg_header(data)) is None


def test_reduction_needs_both_crops_to_shrink() -> None:
    assert reduction([(0, 0, 896, 1000), (0, 0, 1200, 1020)], [224, 255]) == 2
    assert reduction([(0, 0, 896, 1000), (0, 0, 1000, 1000)], [224, 255]) == 1
    assert reduction([(0, 0, 4000, 3600), (0, 0, 4200, 4080)], [224, 255]) == 8


def old_crops(crop: A.CropTransform, path: Path, seed: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    return crop(load_image(path))


@pytest.mark.parametrize("kind", list(kinds()))
def test_worker_crops_equal_the_old_path_with_the_same_boxes(kind: str, tmp_path: Path) -> None:
    """Full-size decode (500x375-like photos, 224-px views): the new path draws the same boxes
    from the header's size and gives the old path's pixels exactly."""
    path = tmp_path / "a.jpg"
    path.write_bytes(kinds()[kind])
    crop = A.CropTransform(JigsawGeometry())
    for seed in range(3):
        want = old_crops(crop, path, seed)
        torch.manual_seed(seed)
        got = crop(path)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and (g.int() - w.int()).abs().max() <= 0


def test_reduced_decode_within_the_resize_tolerance(tmp_path: Path) -> None:
    """Large photos, small views (both crops shrink 4x or more): the DCT-scaled decode + PIL's
    resize of the mapped (fractional) box against the full decode + resize of the same box.
    Measured: mean 0.24 levels, 99th percentile 2, the odd pixel on a sharp edge up to 25:
    the DCT scaling is another low-pass than the bilinear one (docs/reference.md)."""
    geo = JigsawGeometry.for_image_size(64)
    crop, full = A.CropTransform(geo), A.CropTransform(geo, reduce=False)
    diffs, ks = [], set()
    for k, name in enumerate(("astronaut", "chelsea", "coffee", "rocket")):
        path = tmp_path / f"{name}.jpg"
        photo(name).save(path, quality=90)
        for seed in range(4):
            torch.manual_seed(10 * k + seed)
            boxes = crop.boxes(*Image.open(path).size)
            ks.add(reduction(boxes, crop.sizes))
            torch.manual_seed(10 * k + seed)
            got = crop(path)
            torch.manual_seed(10 * k + seed)
            want = full(path)
            diffs += [(g.int() - w.int()).abs().float() for g, w in zip(got, want, strict=True)]
    assert 2 in ks, ks
    diff = torch.cat([d.flatten() for d in diffs])
    assert diff.mean() < 0.4 and torch.quantile(diff, 0.99) <= 3, (diff.mean(), diff.max())


def test_bad_files_are_the_same_one_line_and_skippable(tmp_path: Path) -> None:
    good = kinds()["baseline"]
    bad = {"empty.jpg": b"", "cut.jpg": good[: len(good) // 2], "text.jpg": b"not an image"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    paths = sorted(tmp_path.iterdir())
    crop = A.CropTransform(JigsawGeometry())
    for path in paths:
        with pytest.raises(UserError) as new:
            crop(path)
        with pytest.raises(UserError) as old:
            load_image(path)
        assert str(new.value) == str(old.value) and "\n" not in str(new.value)
    dataset = ImageDataset(ImageList(tmp_path, paths, [-1] * 3, []), crop, skip_bad=True)
    assert [dataset[i] for i in range(3)] == [None] * 3


def test_pixel_limit_is_checked_from_the_header(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(kinds()["baseline"])
    monkeypatch.setenv("PIRL_TOOLS_MAX_PIXELS", "1000")
    with pytest.raises(UserError, match="over the limit"):
        A.CropTransform(JigsawGeometry())(path)


def test_encoded_transform_sends_jpegs_and_decodes_the_rest(tmp_path: Path) -> None:
    """The GPU path's worker: bytes + the same boxes for a JPEG; crops (the CPU path's) for
    CMYK, a progressive JPEG and a PNG; and DeviceDecode on the CPU gives CropTransform's
    full-size crops."""
    data = kinds()
    files = {
        "a.jpg": data["baseline"],
        "c.jpg": data["cmyk"],
        "g.jpg": data["grayscale"],
        "i.jpg": data["progressive"],
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    photo("coffee", (120, 90)).save(tmp_path / "p.png")
    items, want, crop = encoded_and_cropped(tmp_path)
    for i, path in enumerate(sorted(tmp_path.iterdir())):
        torch.manual_seed(i)
        size = load_image(path).size
        assert items[i].boxes == crop.boxes(*size)
    assert [e.data is not None for e in items] == [True, False, True, False, False]
    images, sources = A.DeviceDecode(crop)(items, torch.device("cpu"))
    torch.testing.assert_close(images, torch.stack([w[0] for w in want]), atol=1, rtol=0)
    torch.testing.assert_close(sources, torch.stack([w[1] for w in want]), atol=1, rtol=0)
    assert isinstance(items[0], EncodedImage)


def test_encoded_batches_collate_as_a_list(tmp_path: Path) -> None:
    from pirl.data import collate_skipping

    path = tmp_path / "a.jpg"
    path.write_bytes(kinds()["baseline"])
    dataset = ImageDataset(
        ImageList(tmp_path, [path] * 3, [0] * 3, ["x"]), A.EncodedTransform(JigsawGeometry())
    )
    (views, labels, idx), skipped = collate_skipping([dataset[0], None, dataset[2]])
    assert skipped == 1 and len(views) == 2 and idx.tolist() == [0, 2]
    assert np.array_equal(labels.numpy(), [0, 0])


def test_decode_flag_is_checked_and_recorded() -> None:
    from pirl.pretrain import PirlTrainer, PretrainConfig

    assert PretrainConfig().resolved().decode == "auto"
    for bad in (dict(decode="nvjpeg"), dict(decode="gpu", augment="pil")):
        with pytest.raises(UserError, match="--decode"):
            PretrainConfig(**bad).resolved()
    cfg = PretrainConfig(decode="gpu", batch_size=4, num_negatives=8).resolved()
    with pytest.raises(UserError, match="not a CUDA GPU"):
        PirlTrainer.build(cfg, 10, torch.device("cpu"))
    trainer = PirlTrainer.build(dataclasses.replace(cfg, decode="auto"), 10, torch.device("cpu"))
    assert trainer.device_decode is None and type(trainer.transform()) is A.CropTransform


def test_trainer_loss_through_device_decode(tmp_path: Path) -> None:
    """The wiring of decoding on the device (DeviceDecode before device_views), run on the
    CPU: a batch of EncodedImage gives the loss that CropTransform's crops give (within the
    one grey level of the float resize the device path uses)."""
    from pirl.pretrain import PirlTrainer, PretrainConfig

    cfg = PretrainConfig(  # the tolerance is calibrated for T 0.07 and augmented patches
        batch_size=3, num_negatives=8, image_size=64, temperature=0.07, patch_augment="independent"
    ).resolved()
    trainer = PirlTrainer.build(cfg, 3, torch.device("cpu"))
    geo = JigsawGeometry.for_image_size(64)
    path = tmp_path / "a.jpg"
    path.write_bytes(kinds()["baseline"])
    enc, crop = A.EncodedTransform(geo, reduce=False), A.CropTransform(geo, reduce=False)
    torch.manual_seed(0)
    items = [enc(path) for _ in range(3)]
    torch.manual_seed(0)
    crops = [crop(path) for _ in range(3)]
    views = torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])
    idx = torch.arange(3)
    losses = []
    for decode, batch in ((None, views), (A.DeviceDecode(crop), items)):
        trainer.device_decode = decode
        gens = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
        losses.append(trainer.loss(trainer.model, batch, idx, *gens, amp=False)[0])
    torch.testing.assert_close(losses[0], losses[1], rtol=3e-3, atol=0)


def test_gpu_decode_refuses_the_drivers_memory_pools(monkeypatch) -> None:
    """With cudaMallocAsync one stream's freed memory may go to another, which nvJPEG's
    private stream would not wait for: --decode gpu stops with one line, as on a CPU."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "native")
    A.require_gpu_decode(cuda)
    with pytest.raises(UserError, match="not a CUDA GPU"):
        A.require_gpu_decode(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_allocator_backend", lambda: "cudaMallocAsync")
    with pytest.raises(UserError, match="native CUDA allocator"):
        A.require_gpu_decode(cuda)


def test_gpu_decode_is_refused_before_the_run_folder_is_touched(tmp_path: Path) -> None:
    """An --overwrite run whose --decode gpu is refused leaves the old run as it was."""
    from pirl.pretrain import PretrainConfig, pretrain

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    cfg = PretrainConfig(out=str(out), decode="gpu", device="cpu", overwrite=True)
    with pytest.raises(UserError, match="not a CUDA GPU"):
        pretrain(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert (out / "config.json").read_text() == "{}"


def test_a_refused_jpeg_is_decoded_on_the_cpu_and_logged_once(tmp_path, monkeypatch, caplog):
    """Where the device decoder refuses a JPEG, the worker path's crops stand in; the first
    refusal is logged, the rest counted."""
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(kinds()["baseline"])
    items, want, crop = encoded_and_cropped(tmp_path)
    monkeypatch.setattr(A, "decode_on_device", lambda data, device: [None] * len(data))
    decode = A.DeviceDecode(crop)
    with caplog.at_level("WARNING", logger="pirl.augment"):
        images, sources = decode(items, torch.device("cpu"))
    assert decode.refused == 3
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [str(tmp_path / "0.jpg")]
    assert torch.equal(images, torch.stack([w[0] for w in want]))
    assert torch.equal(sources, torch.stack([w[1] for w in want]))
