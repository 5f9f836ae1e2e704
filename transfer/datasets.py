"""Classification benchmarks in their real on-disk layouts: VOC2007, ImageNet, Places205, iNat2018.

Each reader returns a `Split`: image paths, labels and class names. VOC07 labels are an
(n, classes) int8 matrix in {1, 0, -1} (positive, difficult, negative, as the devkit writes
them); the others are integer class indices. VISSL's VOC `<split>_labels.npy` files use
{1 present, 0 absent, -1 difficult}; `voc_labels` converts them to ours.

Layouts read (DIR is --data):
- voc07: DIR (or DIR/VOC2007, DIR/VOCdevkit/VOC2007) with ImageSets/Main/{trainval,test}.txt,
  ImageSets/Main/<class>_{trainval,test}.txt (lines "<id> <1|0|-1>") and JPEGImages/<id>.jpg.
- imagenet: DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG (ImageFolder).
- places205: DIR/trainvalsplit_places205/{train,val}_places205.csv with lines
  "relative/path.jpg label", images relative to DIR/images256 (or DIR).
- inat18: DIR/{train,val}2018.json (COCO style: images with id and file_name, annotations with
  image_id and category_id), images relative to DIR. Labels index the sorted category ids of
  the "categories" list of train2018.json (all ids seen in its annotations when absent).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pirl.data import list_images, require_files
from pirl.errors import UserError

BENCHMARKS = ("voc07", "imagenet", "places205", "inat18")
EMBEDDED_SIZE = 32
EMBEDDED_VERSION = "embedded-classification-v1"
SPLITS = {
    "voc07": ("trainval", "test"),
    "imagenet": ("train", "val"),
    "places205": ("train", "val"),
    "inat18": ("train", "val"),
}


@dataclass
class Split:
    """One split of a benchmark: row i of `labels` belongs to `paths[i]`."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def _read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of every non-blank line of a text file."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    out = []
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            try:
                fields = raw.decode("utf-8").split()
            except UnicodeDecodeError:
                raise UserError(f"{path}:{i}: not UTF-8 text") from None
            if fields:
                out.append((i, fields))
    return out


def voc_root(root: str | Path) -> Path:
    """Find the VOC2007 folder whether DIR is it, its parent, or the VOCdevkit's parent."""
    root = Path(root)
    for cand in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (cand / "ImageSets" / "Main").is_dir():
            return cand
    raise UserError(f"{root}: no VOC2007/ImageSets/Main folder found")


def voc07(root: str | Path, split: str) -> Split:
    """VOC07 image-level labels: 1 present, 0 difficult only, -1 absent, per class file."""
    base = voc_root(root)
    main = base / "ImageSets" / "Main"
    ids = []
    for lineno, fields in _read_lines(main / f"{split}.txt"):
        if len(fields) != 1:
            raise UserError(f"{main / f'{split}.txt'}:{lineno}: expected one image id per line")
        ids.append(fields[0])
    if not ids:
        raise UserError(f"{main / f'{split}.txt'}: no image ids")
    suffix = f"_{split}.txt"
    classes = sorted(p.name[: -len(suffix)] for p in main.glob(f"*{suffix}"))
    if not classes:
        raise UserError(f"{main}: no <class>{suffix} files")
    row = {i: r for r, i in enumerate(ids)}
    labels = np.zeros((len(ids), len(classes)), dtype=np.int8)
    for c, name in enumerate(classes):
        path = main / f"{name}{suffix}"
        seen = np.zeros(len(ids), dtype=bool)
        for lineno, fields in _read_lines(path):
            if len(fields) != 2 or fields[1] not in ("1", "0", "-1"):
                raise UserError(f"{path}:{lineno}: expected '<image id> <1|0|-1>'")
            if fields[0] not in row:
                raise UserError(f"{path}:{lineno}: image {fields[0]} is not in {split}.txt")
            labels[row[fields[0]], c] = int(fields[1])
            seen[row[fields[0]]] = True
        if not seen.all():
            missing = ids[int(np.flatnonzero(~seen)[0])]
            raise UserError(f"{path}: no label for image {missing}")
    paths = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
    return Split(paths, labels, classes)


# What each VOC07 label encoding means; "devkit" is the one every probe uses internally.
VOC_LABEL_ENCODINGS = {
    "devkit": "1 present, 0 difficult, -1 absent (the devkit's <class>_<split>.txt)",
    "vissl": "1 present, 0 absent, -1 difficult (VISSL's <split>_labels.npy)",
}


def voc_labels(labels: np.ndarray, encoding: str, source: str | Path = "labels") -> np.ndarray:
    """VOC07 labels in the devkit encoding, so a VISSL file's absent (0) is not read as difficult
    (ignored at test), which would silently raise the mAP; UserError when the file looks like
    the other encoding (more "difficult" than "absent" entries, never so in VOC)."""
    if encoding not in VOC_LABEL_ENCODINGS:
        raise UserError(f"unknown label encoding {encoding!r}; choose from devkit, vissl")
    labels = np.asarray(labels)
    difficult, absent = (0, -1) if encoding == "devkit" else (-1, 0)
    if (labels == difficult).sum() > (labels == absent).sum():
        other = "vissl" if encoding == "devkit" else "devkit"
        raise UserError(
            f"{source}: read as {encoding} ({VOC_LABEL_ENCODINGS[encoding]}) it has more "
            f"difficult than absent entries; it looks {other}-encoded: --label-encoding {other}"
        )
    if encoding == "devkit":
        return labels
    return np.select([labels == 1, labels == 0], [1, -1], 0).astype(labels.dtype)


def _imagenet(root: str | Path, split: str) -> Split:
    root = Path(root)
    train = list_images(root / "train")
    images = train if split == "train" else list_images(root / split)
    index = {c: i for i, c in enumerate(train.classes)}
    extra = [c for c in images.classes if c not in index]
    if extra:
        raise UserError(f"{root / split}: class folder {extra[0]!r} is not in {root / 'train'}")
    labels = np.array([index[images.classes[j]] for j in images.labels], dtype=np.int64)
    return Split(images.paths, labels, train.classes)


def _places205(root: str | Path, split: str) -> Split:
    root = Path(root)
    listing = root / "trainvalsplit_places205" / f"{split}_places205.csv"
    if not listing.is_file() and (root / f"{split}_places205.csv").is_file():
        listing = root / f"{split}_places205.csv"
    image_root = root / "images256" if (root / "images256").is_dir() else root
    paths, labels = [], []
    for lineno, fields in _read_lines(listing):
        if len(fields) != 2 or not (fields[1].isascii() and fields[1].isdigit()):
            raise UserError(f"{listing}:{lineno}: expected 'relative/path.jpg label'")
        paths.append(image_root / fields[0])
        labels.append(int(fields[1]))
    if not paths:
        raise UserError(f"{listing}: no images listed")
    names: dict[int, str] = {}
    for p, y in zip(paths, labels, strict=True):
        names.setdefault(y, p.parent.name)
    classes = [names.get(i, str(i)) for i in range(max(labels) + 1)]
    return Split(paths, np.array(labels, dtype=np.int64), classes)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise UserError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    return data


def _inat18(root: str | Path, split: str) -> Split:
    root = Path(root)
    train = _load_json(root / "train2018.json")
    data = train if split == "train" else _load_json(root / f"{split}2018.json")
    path = root / f"{split}2018.json"
    try:
        if train.get("categories"):
            cats = sorted((c["id"], c.get("name", str(c["id"]))) for c in train["categories"])
        else:
            cats = [(i, str(i)) for i in sorted({a["category_id"] for a in train["annotations"]})]
        files = {im["id"]: im["file_name"] for im in data["images"]}
        by_image = {a["image_id"]: a["category_id"] for a in data["annotations"]}
    except (KeyError, TypeError) as exc:
        raise UserError(f"{path}: missing key {exc} in an image, annotation or category") from None
    index = {cid: i for i, (cid, _) in enumerate(cats)}
    paths, labels = [], []
    for image_id, name in files.items():
        if image_id not in by_image:
            raise UserError(f"{path}: image {image_id} has no annotation")
        if by_image[image_id] not in index:
            raise UserError(f"{path}: image {image_id} has unknown category {by_image[image_id]}")
        paths.append(root / name)
        labels.append(index[by_image[image_id]])
    if not paths:
        raise UserError(f"{path}: no images")
    return Split(paths, np.array(labels, dtype=np.int64), [n for _, n in cats])


def load_split(benchmark: str, root: str | Path, split: str) -> Split:
    """Read one split of a benchmark from its real layout; UserError naming the bad file."""
    if benchmark not in BENCHMARKS:
        raise UserError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    if split not in SPLITS[benchmark]:
        raise UserError(f"{benchmark} has splits {SPLITS[benchmark]}, not {split!r}")
    reader = {"voc07": voc07, "imagenet": _imagenet, "places205": _places205, "inat18": _inat18}[
        benchmark
    ]
    data = reader(root, split)
    require_files(data.paths, f"{root} ({benchmark} {split})")
    return data


def build_embedded(
    root: str | Path, n: int = 600, size: int = 32, seed: int = 0
) -> dict[str, Path]:
    """Write the first n packaged digits-on-photos images in all four layouts (2:1 train/test).

    The ten digits are the classes; for voc07 every image is positive for its digit and
    negative for the others, except that one positive in ten is marked difficult (0).
    """
    from PIL import Image

    from pirl.data import embedded_images

    root = Path(root)
    images, digits = embedded_images(size, seed)
    images, digits = images[:n], digits[:n]
    rng = np.random.default_rng(seed)
    difficult = rng.random(n) < 0.1
    test = np.arange(n) % 3 == 0
    names = [f"digit{d}" for d in range(10)]
    out = {b: root / b for b in BENCHMARKS}
    voc = out["voc07"] / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
    ids = {s: [] for s in ("trainval", "test")}
    places = {s: [] for s in ("train", "val")}
    inat = {s: {"images": [], "annotations": []} for s in ("train", "val")}
    for i, (img, d) in enumerate(zip(images, digits, strict=True)):
        pil = Image.fromarray(img)
        vs, cs = ("test", "val") if test[i] else ("trainval", "train")
        ids[vs].append(f"{i:06d}")
        pil.save(voc / "JPEGImages" / f"{i:06d}.jpg", quality=95)
        for sub in (
            out["imagenet"] / cs / names[d],
            out["places205"] / "images256" / "d" / names[d],
            out["inat18"] / "train_val2018" / names[d],
        ):
            sub.mkdir(parents=True, exist_ok=True)
            pil.save(sub / f"{i:06d}.jpg", quality=95)
        places[cs].append(f"d/{names[d]}/{i:06d}.jpg {d}")
        inat[cs]["images"].append({"id": i, "file_name": f"train_val2018/{names[d]}/{i:06d}.jpg"})
        inat[cs]["annotations"].append({"id": i, "image_id": i, "category_id": int(d)})
    for s, lst in ids.items():
        (voc / "ImageSets" / "Main" / f"{s}.txt").write_text("".join(f"{x}\n" for x in lst))
        for c, name in enumerate(names):
            lines = []
            for x in lst:
                i = int(x)
                flag = (0 if difficult[i] else 1) if digits[i] == c else -1
                lines.append(f"{x} {flag:2d}\n")
            (voc / "ImageSets" / "Main" / f"{name}_{s}.txt").write_text("".join(lines))
    split_dir = out["places205"] / "trainvalsplit_places205"
    split_dir.mkdir(parents=True, exist_ok=True)
    cats = [{"id": c, "name": name} for c, name in enumerate(names)]
    for s in ("train", "val"):
        (split_dir / f"{s}_places205.csv").write_text("".join(f"{x}\n" for x in places[s]))
        (out["inat18"] / f"{s}2018.json").write_text(json.dumps({**inat[s], "categories": cats}))
    return out


def embedded_benchmarks(n: int = 600, size: int = EMBEDDED_SIZE) -> dict[str, Path]:
    """The embedded set in all four layouts, written once under cache_dir() and reused."""
    from pirl.data import cached_folder

    root = cached_folder(
        f"{EMBEDDED_VERSION}-{n}-{size}", lambda tmp: build_embedded(tmp, n=n, size=size)
    )
    return {b: root / b for b in BENCHMARKS}
