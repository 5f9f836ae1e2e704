import numpy as np
import pytest

from pirl.errors import UserError
from transfer.voc_ap import (
    IOU_THRESHOLDS,
    Detections,
    GroundTruth,
    class_ap,
    evaluate,
    read_devkit_detections,
    voc_ap,
    write_devkit_detections,
)


def test_voc_ap_hand_worked_curves():
    rec, prec = np.array([0.5, 1.0]), np.array([1.0, 0.5])
    # 11-point: recall thresholds 0..0.5 see precision 1, 0.6..1.0 see 0.5.
    assert voc_ap(rec, prec, True) == pytest.approx((6 * 1.0 + 5 * 0.5) / 11)
    assert voc_ap(rec, prec, False) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    # Precision is made monotone: the dip to 0.2 is lifted by the later 0.6.
    rec, prec = np.array([0.25, 0.25, 0.5, 0.75]), np.array([1.0, 0.5, 0.2 / 0.3, 0.6])
    assert voc_ap(rec, prec, False) == pytest.approx(0.25 * 1 + 0.25 * (2 / 3) + 0.25 * 0.6)
    assert voc_ap(np.zeros(0), np.zeros(0), True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), False) == 0.0


def _toy():
    gt = {
        "a": GroundTruth(
            np.array([[1, 1, 10, 10], [21, 21, 30, 30], [41, 41, 50, 50]], float),
            np.array([False, False, True]),
        ),
        "b": GroundTruth(np.zeros((0, 4)), np.zeros(0, bool)),
    }
    dets = Detections(
        ["a", "a", "a", "a", "b"],
        np.array([0.9, 0.8, 0.7, 0.95, 0.1]),
        np.array(
            [
                [1, 1, 10, 10],  # exact on box 0: TP at every threshold
                [1, 1, 10, 10],  # duplicate: FP
                [21, 21, 30, 35],  # IoU 100/150 with box 1: TP up to 0.65, FP above
                [41, 41, 50, 50],  # on the difficult box: ignored
                [1, 1, 5, 5],  # image without boxes: FP (ranked last)
            ],
            float,
        ),
    )
    return gt, dets


def test_class_ap_hand_worked():
    gt, dets = _toy()
    ap07 = class_ap(gt, dets, IOU_THRESHOLDS, True)
    area = class_ap(gt, dets, IOU_THRESHOLDS, False)
    # IoU <= 0.65: TP FP TP FP -> recall .5 .5 1 1, precision 1 .5 2/3 1/2.
    low07, low_area = (6 + 5 * 2 / 3) / 11, 0.5 + 0.5 * 2 / 3
    # IoU >= 0.70: TP FP FP FP -> recall stays .5 with precision 1 at best.
    high07, high_area = 6 / 11, 0.5
    for t, thr in enumerate(IOU_THRESHOLDS):
        low = thr < 100 / 150
        assert ap07[t] == pytest.approx(low07 if low else high07)
        assert area[t] == pytest.approx(low_area if low else high_area)
    res = evaluate({"x": gt}, {"x": dets}, ["x"], True)
    assert res["AP50"] == pytest.approx(100 * low07)
    assert res["AP75"] == pytest.approx(100 * high07)
    assert res["AP"] == pytest.approx(100 * (4 * low07 + 6 * high07) / 10)


def _brute_force(gt, dets, thresh, use_07):
    """The devkit's loop, written out plainly: one detection at a time in score order."""
    npos = sum(int((~g.difficult).sum()) for g in gt.values())
    taken = {k: [False] * len(g.boxes) for k, g in gt.items()}
    order = sorted(range(len(dets.scores)), key=lambda i: -dets.scores[i])
    tp, fp = [], []
    for i in order:
        g = gt[dets.image_ids[i]]
        x1, y1, x2, y2 = dets.boxes[i]
        best, jbest = -1.0, -1
        for j, (a1, b1, a2, b2) in enumerate(g.boxes):
            w = max(min(x2, a2) - max(x1, a1) + 1, 0)
            h = max(min(y2, b2) - max(y1, b1) + 1, 0)
            inter = w * h
            union = (x2 - x1 + 1) * (y2 - y1 + 1) + (a2 - a1 + 1) * (b2 - b1 + 1) - inter
            if inter / union > best:
                best, jbest = inter / union, j
        if best > thresh:
            if g.difficult[jbest]:
                tp.append(0), fp.append(0)
            elif not taken[dets.image_ids[i]][jbest]:
                taken[dets.image_ids[i]][jbest] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec = ctp / npos
    prec = ctp / np.maximum(ctp + cfp, 1e-300)
    if use_07:
        pts = [
            max([p for r, p in zip(rec, prec, strict=True) if r >= t], default=0.0)
            for t in np.linspace(0, 1, 11)
        ]
        return sum(pts) / 11
    # Area: each recall step times the best precision at that recall or beyond.
    ap, prev = 0.0, 0.0
    for k, r in enumerate(rec):
        if r > prev:
            ap += (r - prev) * max(prec[k:])
            prev = r
    return ap


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_class_ap_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    gt = {}
    for i in range(6):
        k = int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, size=(k, 2))
        wh = rng.uniform(10, 40, size=(k, 2))
        gt[f"img{i}"] = GroundTruth(np.hstack([xy, xy + wh]).round(), rng.random(k) < 0.2)
    if sum(int((~g.difficult).sum()) for g in gt.values()) in (0, 10):
        gt["extra"] = GroundTruth(np.array([[5.0, 5, 30, 30]]), np.array([False]))
    ids, boxes = [], []
    for _ in range(40):
        name = list(gt)[rng.integers(len(gt))]
        g = gt[name]
        if len(g.boxes) and rng.random() < 0.7:
            b = g.boxes[rng.integers(len(g.boxes))] + rng.normal(0, 3, size=4)
        else:
            xy = rng.uniform(0, 60, size=2)
            b = np.concatenate([xy, xy + rng.uniform(10, 40, size=2)])
        ids.append(name)
        boxes.append(b)
    dets = Detections(ids, rng.random(len(ids)), np.array(boxes))
    for use_07 in (True, False):
        got = class_ap(gt, dets, IOU_THRESHOLDS, use_07)
        want = [_brute_force(gt, dets, t, use_07) for t in IOU_THRESHOLDS]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert got[0] > 0.1  # the generated detections do find objects


def test_class_without_positives_is_nan_and_left_out():
    gt, dets = _toy()
    empty = {"a": GroundTruth(np.zeros((0, 4)), np.zeros(0, bool))}
    assert np.isnan(class_ap(empty, Detections(), IOU_THRESHOLDS)).all()
    both = evaluate({"x": gt, "y": empty}, {"x": dets}, ["x", "y"])
    assert both["AP50"] == evaluate({"x": gt}, {"x": dets}, ["x"])["AP50"]


def test_devkit_files_roundtrip_and_errors(tmp_path):
    gt, dets = _toy()
    write_devkit_detections(tmp_path, {"x": dets})
    back = read_devkit_detections(tmp_path, ["x", "y"], list(gt))
    np.testing.assert_allclose(back["x"].scores, dets.scores, atol=1e-6)
    np.testing.assert_allclose(back["x"].boxes, dets.boxes, atol=1e-2)
    assert back["x"].image_ids == dets.image_ids and len(back["y"].scores) == 0
    bad = tmp_path / "comp4_det_test_x.txt"
    bad.write_text("a 0.5 1 2 3\n")
    with pytest.raises(UserError, match="comp4_det_test_x.txt:1"):
        read_devkit_detections(tmp_path, ["x"], list(gt))
    bad.write_text("zzz 0.5 1 2 3 4\n")
    with pytest.raises(UserError, match="'zzz' is not in the test set"):
        read_devkit_detections(tmp_path, ["x"], list(gt))
    with pytest.raises(UserError, match="no comp4_det_test"):
        read_devkit_detections(tmp_path, ["nothing"], list(gt))


def test_iou_must_exceed_threshold_strictly():
    # Inclusive pixels: 10x10 box inside a 10x20 box -> IoU exactly 100/200 = 0.5.
    gt = {"a": GroundTruth(np.array([[1.0, 1, 10, 10]]), np.array([False]))}
    half = Detections(["a"], np.array([1.0]), np.array([[1.0, 1, 10, 20]]))
    np.testing.assert_allclose(class_ap(gt, half, (0.5, 0.49), True), [0.0, 1.0])
