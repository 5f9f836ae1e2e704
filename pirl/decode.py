"""JPEG decoding for pretraining's workers, off PIL's slow path.

The frame size comes from the JPEG header (jpeg_header), so the crop boxes are drawn, in the
original image's coordinates, before anything is decoded. Then: libjpeg-turbo through
torchvision (the same pixels as PIL's libjpeg-turbo, in about half the CPU time), or PIL's
DCT-domain reduced decode (Image.draft: 1/2, 1/4, 1/8) when both crops shrink by twice that
anyway, or nvJPEG on the training GPU for a whole batch. EXIF orientation is ignored, as by
load_image, torchvision's ImageFolder and VISSL: the stored frame is what is cropped.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pirl.data import to_rgb, unreadable

# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic);
# 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) in that range are not frames.
SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
SEQUENTIAL_HUFFMAN = frozenset({0xC0, 0xC1})  # baseline and extended sequential, Huffman-coded
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length field
REDUCTIONS = (8, 4, 2)  # the DCT scalings PIL's draft offers
Box = tuple[int, int, int, int]  # (top, left, height, width), as RandomResizedCrop draws it


@dataclass(frozen=True)
class JpegHeader:
    """What the frame header says: size, colour components (1 grey, 3 YCbCr, 4 CMYK/YCCK), and
    whether it is an 8-bit sequential Huffman frame, the kind nvJPEG decodes in a batch
    (progressive, arithmetic-coded, lossless and 12-bit frames are not)."""

    width: int
    height: int
    components: int
    sequential_8bit: bool


@dataclass
class EncodedImage:
    """A worker's sample for decoding on the device: the JPEG's bytes and its crop boxes, or,
    for a file the device decoder would refuse, the crops the worker decoded itself."""

    path: str
    boxes: list[Box]
    data: bytearray | None = None  # writable: the decoder's tensor shares it, no copy
    crops: list[torch.Tensor] | None = None


def jpeg_header(data: bytes | bytearray) -> JpegHeader | None:
    """The frame header of a JPEG, read from its bytes without decoding; None if data is not a
    JPEG this reader can vouch for (the caller then decodes with PIL). Whole segments are
    skipped by their length, so an EXIF thumbnail's own frame inside APP1 is never read."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # a second SOI, EOI or a scan before any frame
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2:
            return None
        if marker in SOF_MARKERS:
            frame = data[pos + 4 : pos + 2 + length]
            if len(frame) < 6:
                return None
            height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
            if height == 0 or width == 0 or frame[5] not in (1, 3, 4):  # 0: set later (DNL)
                return None
            sequential_8bit = marker in SEQUENTIAL_HUFFMAN and frame[0] == 8
            return JpegHeader(width, height, frame[5], sequential_8bit)
        pos += 2 + length
    return None


def read_file(path: Path) -> bytearray:
    """The file's bytes (writable, so tensors can share them), an OSError as the one line."""
    with unreadable(path), open(path, "rb") as f:
        return bytearray(f.read())


def complete(data: bytes | bytearray) -> bool:
    """Ends with the end-of-image marker (trailing zero padding allowed): a file cut short
    fails here, before a decoder that would only warn (nvJPEG) sees it."""
    return data.rstrip(b"\x00").endswith(b"\xff\xd9")


def reduction(boxes: list[Box], sizes: list[int]) -> int:
    """The DCT scale denominator (8, 4, 2 or 1): the largest k such that every crop, on both
    sides, still shrinks by 2x or more from the 1/k image, so that the antialiased resize
    still averages what the DCT scaling kept (k = shrink / 1 measured 3x the error)."""
    shrink = min(min(h, w) / s for (_, _, h, w), s in zip(boxes, sizes, strict=True))
    return next((k for k in REDUCTIONS if shrink >= 2 * k), 1)


def bytes_tensor(data: bytes | bytearray) -> torch.Tensor:
    """uint8 view of the bytes for torchvision's decoders (bytes are copied: read-only)."""
    return torch.frombuffer(
        data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8
    )


def decode_full(data: bytes | bytearray, header: JpegHeader) -> torch.Tensor | None:
    """(3, H, W) uint8 by libjpeg-turbo through torchvision (pixel-identical to PIL's, tested),
    or None where PIL should decide: CMYK (PIL's Adobe conversion), or a file torchvision
    refuses (PIL then decodes it or words the error)."""
    if header.components == 4:
        return None
    try:
        with warnings.catch_warnings():  # torchvision 0.29's notice that TorchCodec supersedes it
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_jpeg(bytes_tensor(data), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None
    return image if image.shape[1:] == (header.height, header.width) else None


def decode_reduced(path: Path, data: bytes | bytearray, header: JpegHeader, k: int) -> Image.Image:
    """RGB decoded at 1/k of the size in the DCT domain (PIL's draft): ceil(W / k) pixels wide,
    pixel i covering the original's [i k, (i + 1) k)."""
    with unreadable(path), Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (header.width // k, header.height // k))
        img.load()
        return to_rgb(img)


def scale_of(image: Image.Image, header: JpegHeader) -> int:
    """The denominator PIL's draft chose, from the reduced size."""
    for k in (*REDUCTIONS, 1):
        if image.size == (-(-header.width // k), -(-header.height // k)):
            return k
    raise ValueError(f"reduced size {image.size} of a {header.width}x{header.height} JPEG")


def decode_on_device(
    data: list[bytes | bytearray], device: torch.device
) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 on the device for each JPEG, by nvJPEG in one batched call; where the
    batch fails, each image alone, and None for those the device decoder refuses. Never call it
    on the training stream (DeviceDecode uses a side stream): nvJPEG writes its outputs without
    waiting for the current stream's queued work."""
    if not data:
        return []
    tensors = [bytes_tensor(d) for d in data]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out
