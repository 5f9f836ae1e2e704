"""PASCAL VOC detection data in the devkit layout: XML annotations, the data set, the embedded set.

A devkit root holds `VOC2007/`, `VOC2012/`, each with `Annotations/<id>.xml`,
`JPEGImages/<id>.jpg` and `ImageSets/Main/<split>.txt`. Boxes in the XML are 1-based
inclusive pixel indices; training targets use detectron2's continuous convention
(x1 - 1, y1 - 1, x2, y2), and detections go back to the devkit's by adding 1 to x1, y1.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from pirl.data import cached_folder, load_image, require_files
from pirl.errors import UserError
from transfer.voc_ap import GroundTruth, evaluate, read_devkit_detections

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
EMBEDDED_VERSION = "voc-digits-v1"


@dataclass
class VocObject:
    """One annotated object: class name, 1-based inclusive (x1, y1, x2, y2), difficult flag."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass
class VocImage:
    """One image of a devkit split with its annotation."""

    image_id: str
    path: Path
    annotation: Path
    width: int
    height: int
    objects: list[VocObject]


def _text(node: ET.Element, tag: str, path: Path) -> str:
    found = node.find(tag)
    if found is None or found.text is None or not found.text.strip():
        raise UserError(f"{path}: malformed VOC annotation, missing <{tag}>")
    return found.text.strip()


def _number(node: ET.Element, tag: str, path: Path) -> float:
    value = _text(node, tag, path)
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{path}: malformed VOC annotation, <{tag}> is {value!r}")
    return number


def parse_annotation(path: str | Path) -> tuple[int, int, list[VocObject]]:
    """Read one VOC XML file into (width, height, objects), naming the file on any defect."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: annotation file does not exist")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise UserError(f"{path}: malformed XML ({exc})") from None
    size = root.find("size")
    if size is None:
        raise UserError(f"{path}: malformed VOC annotation, missing <size>")
    width, height = int(_number(size, "width", path)), int(_number(size, "height", path))
    if width <= 0 or height <= 0:
        raise UserError(f"{path}: image size {width}x{height} is not positive")
    objects = []
    for obj in root.findall("object"):
        name = _text(obj, "name", path)
        bnd = obj.find("bndbox")
        if bnd is None:
            raise UserError(f"{path}: malformed VOC annotation, <object> {name!r} has no <bndbox>")
        box = tuple(_number(bnd, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        x1, y1, x2, y2 = box
        if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
            raise UserError(
                f"{path}: box {name!r} ({x1:g},{y1:g},{x2:g},{y2:g}) lies outside the "
                f"{width}x{height} image or is inverted"
            )
        diff = obj.find("difficult")
        difficult = diff is not None and (diff.text or "0").strip() not in ("", "0")
        objects.append(VocObject(name, box, difficult))  # type: ignore[arg-type]
    return width, height, objects


def parse_set_name(spec: str) -> tuple[str, str]:
    """'2007/trainval' -> ('2007', 'trainval'): how a devkit split is named on the command line."""
    year, sep, split = spec.partition("/")
    if not sep or not year or not split:
        raise UserError(f"split {spec!r}: expected YEAR/SPLIT, e.g. 2007/trainval")
    return year, split


def read_voc_set(
    devkit: str | Path, year: str, split: str, need_images: bool = True
) -> list[VocImage]:
    """All images of `VOC<year>/ImageSets/Main/<split>.txt` with their parsed annotations."""
    devkit = Path(devkit)
    if not devkit.is_dir():
        raise UserError(f"{devkit}: VOC devkit folder does not exist")
    base = devkit / f"VOC{year}"
    listing = base / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.exists():
        raise UserError(f"{listing}: split list does not exist (is {devkit} a VOCdevkit folder?)")
    try:
        text = listing.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = listing.read_bytes()[: exc.start].count(b"\n") + 1
        raise UserError(f"{listing}:{line}: not UTF-8 text") from None
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise UserError(f"{listing}: empty split list")
    if need_images:
        require_files([base / "JPEGImages" / f"{i}.jpg" for i in ids], listing)
    images = []
    for image_id in ids:
        xml = base / "Annotations" / f"{image_id}.xml"
        jpg = base / "JPEGImages" / f"{image_id}.jpg"
        width, height, objects = parse_annotation(xml)
        images.append(VocImage(image_id, jpg, xml, width, height, objects))
    return images


def voc_classes(images: Sequence[VocImage]) -> list[str]:
    """VOC's 20 classes in devkit order for VOC data; otherwise the sorted names found."""
    names = {o.name for im in images for o in im.objects}
    if names <= set(VOC_CLASSES):
        return list(VOC_CLASSES)
    return sorted(names)


def ground_truth(
    images: Sequence[VocImage], classes: Sequence[str]
) -> dict[str, dict[str, GroundTruth]]:
    """Per class, per image: the boxes the AP evaluation matches against (every image listed)."""
    out: dict[str, dict[str, GroundTruth]] = {c: {} for c in classes}
    for im in images:
        for c in classes:
            objs = [o for o in im.objects if o.name == c]
            out[c][im.image_id] = GroundTruth(
                np.array([o.box for o in objs], dtype=np.float64).reshape(-1, 4),
                np.array([o.difficult for o in objs], dtype=bool),
            )
    return out


def score_devkit_detections(
    devkit: str | Path, detections: str | Path, year: str = "2007", split: str = "test",
    use_07_metric: bool = True,
) -> dict:  # fmt: skip
    """AP/AP50/AP75 of devkit-format result files against a devkit split's annotations."""
    images = read_voc_set(devkit, year, split, need_images=False)
    classes = voc_classes(images)
    dets = read_devkit_detections(detections, classes, [im.image_id for im in images], split)
    return evaluate(ground_truth(images, classes), dets, classes, use_07_metric)


class VocDetectionDataset(torch.utils.data.Dataset):
    """Yields (image in [0, 1] CHW, target with 0-based boxes and 1-based labels, index).

    Difficult objects are kept for training, as detectron2 does. With `train=True` images
    are flipped horizontally with probability 0.5; resizing is the detector's job.
    """

    def __init__(self, images: Sequence[VocImage], classes: Sequence[str], train: bool) -> None:
        self.images, self.train = list(images), train
        self.index = {c: i + 1 for i, c in enumerate(classes)}
        for im in self.images:
            for o in im.objects:
                if o.name not in self.index:
                    raise UserError(
                        f"{im.annotation}: class {o.name!r} is not one of {list(classes)}"
                    )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        im = self.images[i]
        pil = load_image(im.path)
        if pil.size != (im.width, im.height):
            raise UserError(
                f"{im.path}: image is {pil.size[0]}x{pil.size[1]} but {im.annotation.name} "
                f"says {im.width}x{im.height}"
            )
        img = pil_to_tensor(pil).float().div_(255.0)
        boxes = torch.tensor([o.box for o in im.objects], dtype=torch.float32).reshape(-1, 4)
        boxes[:, :2] -= 1.0
        labels = torch.tensor([self.index[o.name] for o in im.objects], dtype=torch.int64)
        if self.train and torch.rand(()) < 0.5:
            img = img.flip(-1)
            boxes = torch.stack(
                [im.width - boxes[:, 2], boxes[:, 1], im.width - boxes[:, 0], boxes[:, 3]], dim=1
            )
        return img, {"boxes": boxes, "labels": labels}, i


def collate(
    batch: list[Any],
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[int]]:
    """Keep images as a list: the detector batches images of different sizes itself."""
    imgs, targets, idx = zip(*batch, strict=True)
    return list(imgs), list(targets), list(idx)


def _annotation_xml(image_id: str, size: int, objects: list[VocObject]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    sz = ET.SubElement(root, "size")
    for tag, v in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(v)
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = o.name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(int(o.difficult))
        bnd = ET.SubElement(obj, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), o.box, strict=True):
            ET.SubElement(bnd, tag).text = str(int(v))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def embedded_detection_images(
    n: int, size: int = 160, seed: int = 0
) -> list[tuple[np.ndarray, list[VocObject]]]:
    """Real sklearn digits pasted (1-3 per image) onto crops of scikit-image's photos, with boxes.

    A box is the tight 1-based inclusive box of the digit's ink; digits drawn faintly are
    marked difficult, as VOC marks objects that are hard to see.
    """
    from skimage import data as skdata
    from sklearn.datasets import load_digits

    digits = load_digits()
    photos = [getattr(skdata, n)() for n in ("astronaut", "chelsea", "coffee", "rocket")]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        photo = photos[rng.integers(len(photos))]
        h, w = photo.shape[:2]
        crop = min(int(size * rng.uniform(1.2, 2.5)), min(h, w) - 1)
        y, x = rng.integers(0, h - crop), rng.integers(0, w - crop)
        bg = Image.fromarray(photo[y : y + crop, x : x + crop]).resize((size, size), Image.BILINEAR)
        canvas = np.asarray(bg, dtype=np.float32) * 0.6
        objects: list[VocObject] = []
        taken = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(len(digits.images)))
            g = int(size * rng.uniform(0.25, 0.45))
            oy, ox = (int(v) for v in rng.integers(0, size - g + 1, size=2))
            if taken[oy : oy + g, ox : ox + g].any():
                continue
            glyph = Image.fromarray((digits.images[k] / 16.0 * 255).astype(np.uint8))
            alpha = np.asarray(glyph.resize((g, g), Image.BICUBIC), dtype=np.float32) / 255.0
            faint = bool(rng.random() < 0.1)
            alpha = alpha * (0.35 if faint else 1.0)
            colour = rng.uniform(0, 255, size=3).astype(np.float32)
            patch = canvas[oy : oy + g, ox : ox + g]
            canvas[oy : oy + g, ox : ox + g] = (
                patch * (1 - alpha[..., None]) + colour * alpha[..., None]
            )
            rows, cols = np.nonzero(alpha > 0.1 * alpha.max())
            box = (
                ox + cols.min() + 1,
                oy + rows.min() + 1,
                ox + cols.max() + 1,
                oy + rows.max() + 1,
            )
            objects.append(
                VocObject(f"digit{digits.target[k]}", tuple(float(v) for v in box), faint)
            )
            taken[oy : oy + g, ox : ox + g] = True
        out.append((canvas.clip(0, 255).astype(np.uint8), objects))
    return out


def build_embedded_voc(
    n_trainval: int = 240, n_test: int = 120, size: int = 160, seed: int = 0
) -> Path:
    """Write the embedded digits-on-photos set once as a VOCdevkit (VOC2007 trainval, test)."""

    def build(tmp: Path) -> None:
        base = tmp / "VOC2007"
        for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
            (base / d).mkdir(parents=True, exist_ok=True)
        samples = embedded_detection_images(n_trainval + n_test, size, seed)
        ids = [f"{i:06d}" for i in range(len(samples))]
        for image_id, (img, objects) in zip(ids, samples, strict=True):
            Image.fromarray(img).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            (base / "Annotations" / f"{image_id}.xml").write_bytes(
                _annotation_xml(image_id, size, objects)
            )
        for split, part in (("trainval", ids[:n_trainval]), ("test", ids[n_trainval:])):
            lines = "".join(i + "\n" for i in part)
            (base / "ImageSets" / "Main" / f"{split}.txt").write_text(lines)

    return cached_folder(f"{EMBEDDED_VERSION}-{n_trainval}-{n_test}-{size}-{seed}", build)
