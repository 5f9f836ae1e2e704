"""One decoding path: every source mode to 8-bit RGB, bad files as one line naming the file."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pirl.data import ImageDataset, list_images, load_image
from pirl.errors import UserError
from pirl.pretrain import PretrainConfig, pretrain


def png_bytes(width: int, height: int, bit_depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG written by hand from the format (IHDR, one IDAT, IEND), for what Pillow cannot
    write: 16-bit RGB, or a header that claims more pixels than the data holds."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16_bit_grey_scales_to_8_bits_instead_of_saturating(tmp_path: Path) -> None:
    values = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    got = np.asarray(load_image(tmp_path / "g16.png"))
    expected = np.round(values / 257.0).astype(np.uint8)  # 65535 -> 255
    assert got.shape == (64, 64, 3)
    assert np.array_equal(got[..., 0], expected) and np.array_equal(got[..., 2], expected)


def test_16_bit_rgb_keeps_its_colours(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, size=(8, 8, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    (tmp_path / "rgb16.png").write_bytes(png_bytes(8, 8, 16, 2, rows))
    got = np.asarray(load_image(tmp_path / "rgb16.png")).astype(int)
    assert np.abs(got - np.round(rgb16 / 257.0)).max() <= 1  # high byte or rounded


def test_palette_grey_alpha_and_cmyk_sources_decode_to_their_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 256, size=(16, 16), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "rgba.png")), rgb)  # alpha dropped
    grey = rgb[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "grey.png")), np.dstack([grey] * 3))
    palette = Image.fromarray(rgb).quantize(16)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    expected = np.asarray(palette.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(tmp_path / "palette.png")), expected)
    smooth = np.asarray(Image.fromarray(rgb).resize((64, 64), Image.BILINEAR))
    Image.fromarray(smooth).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    got = np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)
    assert np.abs(got - smooth.astype(int)).mean() < 4  # JPEG's loss, not inverted colours


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "unreadable image"),
        ("notes.jpg", b"just text, not an image\n", "unreadable image"),
        ("cut.png", "truncate", "unreadable image"),
        ("bomb.png", png_bytes(40_000, 40_000, 1, 0, b"\x00" * 10), "1600 M pixels) is over"),
    ],
)
def test_bad_files_are_one_line_naming_the_file_and_are_skippable(
    tmp_path: Path, name: str, content: bytes | str, reason: str
) -> None:
    if content == "truncate":
        Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 90).save(tmp_path / "whole.png")
        content = (tmp_path / "whole.png").read_bytes()[:60]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_image(path)
    assert str(info.value).startswith(f"{path}: ") and reason in str(info.value)
    assert "\n" not in str(info.value)
    images = list_images(tmp_path)
    dataset = ImageDataset(images, lambda im: im, skip_bad=True)
    assert dataset[images.paths.index(path)] is None


def test_the_pixel_limit_can_be_raised_and_lowered(tmp_path: Path, monkeypatch) -> None:
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "small.png")
    monkeypatch.setenv("PIRL_TOOLS_MAX_PIXELS", "1000")
    with pytest.raises(UserError, match=r"32x32 image .* over the limit"):
        load_image(tmp_path / "small.png")
    monkeypatch.setenv("PIRL_TOOLS_MAX_PIXELS", "1024")
    assert load_image(tmp_path / "small.png").size == (32, 32)
    monkeypatch.setenv("PIRL_TOOLS_MAX_PIXELS", "lots")
    with pytest.raises(UserError, match="PIRL_TOOLS_MAX_PIXELS='lots': expected a positive"):
        load_image(tmp_path / "small.png")


def test_a_bad_image_in_a_worker_is_the_same_one_line(tiny_folder: Path) -> None:
    bad = tiny_folder / "digit0" / "zz_bad.png"
    bad.write_bytes(b"not a png")
    images = list_images(tiny_folder)
    loader = torch.utils.data.DataLoader(
        ImageDataset(images, lambda im: torch.zeros(1)), batch_size=8, num_workers=2
    )
    with pytest.raises(UserError) as info:
        list(loader)
    assert str(info.value).startswith(f"{bad}: unreadable image (")
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)


def test_pretraining_with_two_workers_stops_on_one_line(tiny_folder: Path, tmp_path: Path) -> None:
    (tiny_folder / "digit3" / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    cfg = PretrainConfig(
        data=str(tiny_folder), out=str(tmp_path / "run"), epochs=1, num_workers=2,
        arch="resnet18", width=0.125, image_size=32, batch_size=16, num_negatives=16,
        device="cpu",
    )  # fmt: skip
    with pytest.raises(UserError) as info:
        pretrain(cfg)
    assert "\n" not in str(info.value) and "zz_bad.png: unreadable image" in str(info.value)


def test_every_image_bad_and_skipped_is_an_error_and_no_checkpoint(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / "data" / f"{i}.png").parent.mkdir(exist_ok=True)
        (tmp_path / "data" / f"{i}.png").write_bytes(b"broken")
    cfg = PretrainConfig(
        data=str(tmp_path / "data"), out=str(tmp_path / "run"), epochs=1, num_workers=0,
        arch="resnet18", width=0.125, image_size=32, batch_size=8, num_negatives=4,
        device="cpu", skip_bad_images=True,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"no readable image in epoch 1 \(5 skipped of 5\)"):
        pretrain(cfg)
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_a_data_set_smaller_than_one_batch_still_trains(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(5):
        (tmp_path / "data").mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "data" / f"{i}.png")
    cfg = PretrainConfig(
        data=str(tmp_path / "data"), out=str(tmp_path / "run"), epochs=2, num_workers=0,
        arch="resnet18", width=0.125, image_size=32, batch_size=64, num_negatives=8,
        device="cpu",
    )  # fmt: skip
    trainer = pretrain(cfg)
    assert trainer.step == 2 and (tmp_path / "run" / "checkpoint.pth").exists()
