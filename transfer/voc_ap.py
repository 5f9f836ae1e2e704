"""PASCAL VOC detection AP, computed the way detectron2's PascalVOCDetectionEvaluator does.

Procedure (detectron2 `evaluation/pascal_voc_evaluation.py`, itself py-faster-rcnn's port
of the devkit): per class, detections sorted by descending score are matched greedily to
the ground truth box of highest IoU in their image; IoU uses the devkit's inclusive pixel
convention (width = x2 - x1 + 1); a match needs IoU strictly above the threshold; a match
to a "difficult" box counts as neither TP nor FP; a second match to an already-taken box
is a FP. AP per class is the VOC07 11-point interpolated precision (thresholds
`np.arange(0, 1.1, 0.1)`, as detectron2 uses for VOC2007) or the VOC2010+ area under the
monotone precision envelope. AP is the mean over IoU 0.50, 0.55, ..., 0.95 of the class
mean; AP50 and AP75 are the class means at 0.50 and 0.75. All numbers are percentages.

The greedy matching is vectorised: a detection's best box does not depend on the
threshold, so for each threshold a detection is a TP exactly when it is the first
(highest-scored) above-threshold detection to pick its (image, box) pair.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pirl.errors import UserError

IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))


@dataclass
class GroundTruth:
    """One image's boxes of one class: (N, 4) 1-based inclusive x1 y1 x2 y2, and difficult flags."""

    boxes: np.ndarray
    difficult: np.ndarray


@dataclass
class Detections:
    """Scored boxes of one class over a test set, in the devkit's 1-based pixel coordinates."""

    image_ids: list[str] = field(default_factory=list)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = True) -> float:
    """AP from a precision/recall curve: VOC07 11-point, or the 2010+ envelope area."""
    rec, prec = np.asarray(rec, dtype=np.float64), np.asarray(prec, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = rec >= t
            ap += (prec[above].max() if above.any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _best_overlaps(
    gt: Mapping[str, GroundTruth], image_ids: Sequence[str], boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per detection: best IoU, that box's index, the image's index, the box's difficult flag."""
    names = list(gt)
    index = {n: i for i, n in enumerate(names)}
    img = np.array([index[i] for i in image_ids], dtype=np.int64)
    most = max((len(g.boxes) for g in gt.values()), default=0)
    if most == 0 or len(img) == 0:
        zeros = np.zeros(len(img), dtype=np.int64)
        return np.full(len(img), -np.inf), zeros, img, zeros.astype(bool)
    padded = np.zeros((len(names), most, 4))
    valid = np.zeros((len(names), most), dtype=bool)
    diff = np.zeros((len(names), most), dtype=bool)
    for n, g in gt.items():
        k = len(g.boxes)
        if k:
            padded[index[n], :k] = g.boxes
            valid[index[n], :k] = True
            diff[index[n], :k] = g.difficult
    g = padded[img]  # (D, M, 4)
    b = boxes[:, None, :]
    iw = np.maximum(np.minimum(g[..., 2], b[..., 2]) - np.maximum(g[..., 0], b[..., 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(g[..., 3], b[..., 3]) - np.maximum(g[..., 1], b[..., 1]) + 1.0, 0.0)
    inter = iw * ih
    union = (
        (b[..., 2] - b[..., 0] + 1.0) * (b[..., 3] - b[..., 1] + 1.0)
        + (g[..., 2] - g[..., 0] + 1.0) * (g[..., 3] - g[..., 1] + 1.0)
        - inter
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(valid[img], inter / union, -np.inf)
    jmax = iou.argmax(axis=1)
    ovmax = iou[np.arange(len(img)), jmax]
    return ovmax, jmax, img, diff[img, jmax]


def class_ap(
    gt: Mapping[str, GroundTruth],
    dets: Detections,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    use_07_metric: bool = True,
) -> np.ndarray:
    """AP (fraction, not percent) of one class at each IoU threshold; NaN if it has no positives."""
    unknown = set(dets.image_ids) - set(gt)
    if unknown:
        raise ValueError(f"detections on images outside the test set: {sorted(unknown)[:3]}")
    npos = int(sum((~g.difficult.astype(bool)).sum() for g in gt.values()))
    order = np.argsort(-np.asarray(dets.scores, dtype=np.float64), kind="stable")
    boxes = np.asarray(dets.boxes, dtype=np.float64).reshape(-1, 4)[order]
    ids = [dets.image_ids[i] for i in order]
    ovmax, jmax, img, difficult = _best_overlaps(gt, ids, boxes)
    key = img * (int(jmax.max(initial=0)) + 1) + jmax
    aps = np.full(len(thresholds), np.nan)
    if npos == 0:
        return aps
    for t, thresh in enumerate(thresholds):
        hit = ovmax > thresh
        cand = np.flatnonzero(hit & ~difficult)
        tp = np.zeros(len(ids))
        _, first = np.unique(key[cand], return_index=True)
        tp[cand[first]] = 1.0
        fp = (~hit).astype(np.float64)
        fp[cand] = 1.0 - tp[cand]
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / npos
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps[t] = voc_ap(rec, prec, use_07_metric)
    return aps


def evaluate(
    gt: Mapping[str, Mapping[str, GroundTruth]],
    dets: Mapping[str, Detections],
    classes: Sequence[str],
    use_07_metric: bool = True,
) -> dict:
    """AP, AP50, AP75 (percent) and per-class AP50 from ground truth and detections per class.

    `gt[class][image_id]` must list every test image (empty boxes where the class is absent),
    since that is how images without the class count. Classes without positives are left out
    of the means (detectron2 would report NaN).
    """
    aps = [
        class_ap(gt[c], dets.get(c, Detections()), IOU_THRESHOLDS, use_07_metric) for c in classes
    ]
    per_class = np.stack(aps) * 100.0
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        by_iou = np.nanmean(per_class.reshape(-1, len(IOU_THRESHOLDS)), axis=0)
    i50, i75 = IOU_THRESHOLDS.index(0.5), IOU_THRESHOLDS.index(0.75)
    return {
        "AP": float(np.mean(by_iou)),
        "AP50": float(by_iou[i50]),
        "AP75": float(by_iou[i75]),
        "metric": "voc07-11point" if use_07_metric else "area",
        "per_class_AP50": {c: float(per_class[k, i50]) for k, c in enumerate(classes)},
        "per_class_AP": {c: float(np.mean(per_class[k])) for k, c in enumerate(classes)},
    }


def devkit_filename(cls: str, split: str = "test") -> str:
    """The devkit's results file name for a class (comp4: trained on any data)."""
    return f"comp4_det_{split}_{cls}.txt"


def read_devkit_detections(
    folder: str | Path, classes: Sequence[str], image_ids: Sequence[str], split: str = "test"
) -> dict[str, Detections]:
    """Read `comp4_det_<split>_<class>.txt` files (image_id score x1 y1 x2 y2, 1-based pixels)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: detections folder does not exist")
    known = set(image_ids)
    out: dict[str, Detections] = {}
    found = 0
    for cls in classes:
        path = folder / devkit_filename(cls, split)
        if not path.exists():
            out[cls] = Detections()
            continue
        found += 1
        ids: list[str] = []
        rows: list[list[float]] = []
        for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{path}:{n}: not UTF-8 text") from None
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise UserError(f"{path}:{n}: expected 'image_id score x1 y1 x2 y2', got {line!r}")
            if parts[0] not in known:
                raise UserError(f"{path}:{n}: image {parts[0]!r} is not in the {split} set")
            try:
                values = [float(v) for v in parts[1:]]
            except ValueError:
                raise UserError(f"{path}:{n}: non-numeric score or box in {line!r}") from None
            if not np.isfinite(values).all():
                raise UserError(f"{path}:{n}: NaN or infinite score or box in {line!r}")
            rows.append(values)
            ids.append(parts[0])
        arr = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
        out[cls] = Detections(ids, arr[:, 0], arr[:, 1:])
    if found == 0:
        raise UserError(f"{folder}: no {devkit_filename('<class>', split)} files for any class")
    return out


def write_devkit_detections(
    folder: str | Path, dets: Mapping[str, Detections], split: str = "test"
) -> None:
    """Write detections in the devkit's results format, so any scorer can read them back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for cls, d in dets.items():
        lines = [
            f"{i} {s:.6f} {b[0]:.2f} {b[1]:.2f} {b[2]:.2f} {b[3]:.2f}"
            for i, s, b in zip(d.image_ids, d.scores, d.boxes, strict=True)
        ]
        (folder / devkit_filename(cls, split)).write_text("".join(x + "\n" for x in lines))
