"""Our torchvision detector and VOC AP checked against detectron2 itself, and the detectron2
backend end to end. Skipped where detectron2 is not installed (CI installs its wheel)."""

import csv
import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip(
    "detectron2", reason="detectron2 is not installed (make test installs ../shared/wheels/)"
)

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data.datasets.pascal_voc import load_voc_instances  # noqa: E402
from detectron2.evaluation import PascalVOCDetectionEvaluator  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from pirl.data import load_image  # noqa: E402
from pirl.errors import UserError  # noqa: E402
from pirl.trunk import build_trunk  # noqa: E402
from pirl.weights import save_detectron2  # noqa: E402
from transfer.detection import (  # noqa: E402
    DetectionConfig,
    build_c4_detector,
    detectron2_config,
    run_detection,
    write_detectron2_handover,
)
from transfer.detectron2_backend import (  # noqa: E402
    detector_from_detectron2,
    detector_to_detectron2,
    load_trunk_weights,
    voc_records,
)
from transfer.voc_ap import Detections, evaluate  # noqa: E402
from transfer.voc_detection import (  # noqa: E402
    build_embedded_voc,
    ground_truth,
    read_voc_set,
    voc_classes,
)

HEADS = [
    "proposal_generator.rpn_head.anchor_deltas",
    "proposal_generator.rpn_head.conv",
    "proposal_generator.rpn_head.objectness_logits",
    "roi_heads.box_predictor.bbox_pred",
    "roi_heads.box_predictor.cls_score",
]


def _r50(seed):
    """A full-width ResNet-50 whose BN statistics and affine are far from the defaults."""
    torch.manual_seed(seed)
    trunk = build_trunk("resnet50")
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return trunk.eval()


def _cfg(tmp_path, **kw):
    return DetectionConfig(
        out=str(tmp_path), device="cpu", train_sizes=(64,), test_size=64, max_size=64, **kw
    )


def _d2_model(tmp_path, cfg, num_classes, **overrides):
    """detectron2's own R50-C4 built from the config our hand-over writes."""
    conf = detectron2_config(cfg, tmp_path / "none.pkl", "resnet50", num_classes)
    path = tmp_path / "d2.yaml"
    path.write_text(json.dumps(conf))
    d2cfg = get_cfg()
    d2cfg.merge_from_file(str(path))
    d2cfg.merge_from_list([x for kv in overrides.items() for x in kv])
    return build_model(d2cfg).eval()


def _images(n=3, seed=3):
    devkit = build_embedded_voc(n_trainval=2, n_test=n, size=64, seed=seed)
    ims = read_voc_set(devkit, "2007", "test")
    rgb = [torch.from_numpy(np.asarray(load_image(im.path))).permute(2, 0, 1) for im in ims]
    return devkit, ims, rgb


def _head_modules(keys):
    return sorted({k.rsplit(".", 1)[0] for k in keys})


@torch.no_grad()
def test_same_trunk_gives_the_same_res4_through_detectron2_rgb_and_bgr(tmp_path):
    trunk = _r50(0)
    cfg = _cfg(tmp_path)
    _, pkl = write_detectron2_handover(cfg, trunk, 3)
    ours = build_c4_detector(trunk, 3, (64,), 64, 64).eval()
    _, _, rgb = _images()
    want = ours.backbone(ours.transform([x.float() / 255 for x in rgb])[0].tensors)["res4"]
    assert want.shape == (3, 1024, 4, 4)

    d2 = _d2_model(tmp_path, cfg, 3)
    assert _head_modules(load_trunk_weights(d2, pkl)) == HEADS  # every trunk key filled
    got = d2.backbone(d2.preprocess_image([{"image": x.float()} for x in rgb]).tensor)["res4"]
    assert (got - want).norm() / want.norm() < 1e-5

    # detectron2's default convention: BGR input, BGR mean/std, first conv's inputs reversed.
    bgr = _d2_model(
        tmp_path, cfg, 3, **{"INPUT.FORMAT": "BGR",
                             "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
                             "MODEL.PIXEL_STD": [57.375, 57.12, 58.395]},
    )  # fmt: skip
    load_trunk_weights(bgr, pkl)
    bgr.backbone.stem.conv1.weight.copy_(bgr.backbone.stem.conv1.weight.flip(1))
    inputs = [{"image": x.flip(0).float()} for x in rgb]
    got = bgr.backbone(bgr.preprocess_image(inputs).tensor)["res4"]
    assert (got - want).norm() / want.norm() < 1e-5


def test_missing_backbone_key_is_refused_from_detectrons_load_report(tmp_path):
    state = {k: v for k, v in _r50(1).state_dict().items() if "num_batches" not in k}
    del state["layer3.2.conv2.weight"]
    pkl = save_detectron2(state, tmp_path / "w.pkl")
    d2 = _d2_model(tmp_path, _cfg(tmp_path), 3)
    with pytest.raises(UserError, match=r"w\.pkl: .* missing backbone\.res4\.2\.conv2\.weight"):
        load_trunk_weights(d2, pkl)


def _randomised_detector(seed=0, num_classes=3):
    torch.manual_seed(seed)
    model = build_c4_detector(_r50(seed), num_classes, (64,), 64, 64, proposals=(50, 50))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("rpn.", "roi_heads.box_predictor.")):
                std = 0.002 if "bbox_pred" in name else 0.02
                p.normal_(0, std if p.ndim > 1 else 10 * std)
    return model.eval()


@torch.no_grad()
def test_converted_detector_gives_detectrons_proposals_and_detections(tmp_path):
    ours = _randomised_detector()
    state = ours.state_dict()
    d2 = _d2_model(tmp_path, _cfg(tmp_path, proposals=(50, 50)), 3)
    d2.load_state_dict(detector_to_detectron2(state), strict=True)
    back = detector_from_detectron2(d2.state_dict())
    assert set(back) == set(state)
    for k, v in state.items():  # background box deltas: torchvision never decodes them
        want = v[4:] if "box_predictor.bbox_pred" in k else v
        assert torch.equal(back[k][4:] if "box_predictor.bbox_pred" in k else back[k], want), k

    _, _, rgb = _images()
    images, _ = ours.transform([x.float() / 255 for x in rgb])
    props, _ = ours.rpn(images, ours.backbone(images.tensors))
    inputs = [{"image": x.float(), "height": 64, "width": 64} for x in rgb]
    d2_images = d2.preprocess_image(inputs)
    d2_props, _ = d2.proposal_generator(d2_images, d2.backbone(d2_images.tensor), None)
    for mine, theirs in zip(props, d2_props, strict=True):
        assert len(mine) == 50
        assert torch.allclose(mine, theirs.proposal_boxes.tensor, atol=1e-3)

    outs, d2_outs = ours([x.float() / 255 for x in rgb]), d2(inputs)
    total = 0
    for mine, theirs in zip(outs, d2_outs, strict=True):
        inst = theirs["instances"]
        total += len(inst)
        assert len(mine["boxes"]) == len(inst)
        assert torch.equal(mine["labels"] - 1, inst.pred_classes)
        assert torch.allclose(mine["scores"], inst.scores, atol=1e-5)
        assert torch.allclose(mine["boxes"], inst.pred_boxes.tensor, atol=1e-3)
    assert total > 30


def test_records_from_our_reader_are_detectrons_own(tmp_path):
    devkit, ims, _ = _images(n=5, seed=4)
    classes = voc_classes(ims)
    want = load_voc_instances(str(devkit / "VOC2007"), "test", classes)
    assert voc_records(ims, classes) == want


def _scored_detections(images, classes, seed):
    """Ground-truth boxes jittered, some dropped, plus false positives; distinct scores on
    detectron2's written precision (3 decimals) and boxes on its 1 decimal."""
    rng = np.random.default_rng(seed)
    rows = []
    for im in images:
        for o in im.objects:
            if o.name in classes and rng.random() < 0.85:
                box = np.array(o.box) + rng.normal(0, 2.0, 4)
                rows.append((im.image_id, o.name, box))
        for _ in range(2):
            x, y = rng.uniform(1, 40, 2)
            rows.append((im.image_id, classes[rng.integers(len(classes))], [x, y, x + 20, y + 20]))
    scores = rng.permutation(len(rows)) + 1
    return [
        (i, c, s / 1000, np.round(np.asarray(b), 1))
        for (i, c, b), s in zip(rows, scores, strict=True)
    ]


@pytest.mark.parametrize("use_07", [True, False])
def test_our_voc_ap_equals_detectrons_evaluator(tmp_path, use_07):
    devkit, ims, _ = _images(n=8, seed=5)
    # Classes with a positive: detectron2 scores one whose objects are all difficult as 0,
    # ours leaves it out of the mean (documented in voc_ap.evaluate).
    classes = sorted({o.name for im in ims for o in im.objects if not o.difficult})
    rows = _scored_detections(ims, classes, seed=1)
    if "pirl_test_ap" in MetadataCatalog:
        MetadataCatalog.remove("pirl_test_ap")
    MetadataCatalog.get("pirl_test_ap").set(
        thing_classes=classes, dirname=str(devkit / "VOC2007"), year=2007 if use_07 else 2012,
        split="test",
    )  # fmt: skip
    ev = PascalVOCDetectionEvaluator("pirl_test_ap")
    ev.reset()
    for im in ims:
        mine = [r for r in rows if r[0] == im.image_id]
        inst = Instances((im.height, im.width))
        boxes = torch.tensor(np.array([r[3] for r in mine]).reshape(-1, 4), dtype=torch.float64)
        boxes[:, :2] -= 1.0  # the detector's continuous coordinates; the evaluator adds 1 back
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.tensor([r[2] for r in mine])
        inst.pred_classes = torch.tensor([classes.index(r[1]) for r in mine])
        ev.process([{"image_id": im.image_id}], [{"instances": inst}])
    theirs = ev.evaluate()["bbox"]
    dets = {
        c: Detections(
            [r[0] for r in rows if r[1] == c],
            np.array([r[2] for r in rows if r[1] == c]),
            np.array([r[3] for r in rows if r[1] == c]).reshape(-1, 4),
        )
        for c in classes
    }
    ours = evaluate(ground_truth(ims, classes), dets, classes, use_07)
    assert 20 < ours["AP"] < ours["AP50"] < 100
    for k in ("AP", "AP50", "AP75"):
        assert ours[k] == pytest.approx(theirs[k], abs=1e-9), k


def test_backend_end_to_end_on_the_cpu_with_resume(tmp_path, capsys):
    devkit = build_embedded_voc(n_trainval=4, n_test=3, size=64, seed=1)
    out = tmp_path / "run"
    kw = dict(data=str(devkit), weights="random:resnet50", name="d2", out=str(out),
              train_sets=("2007/trainval",), batch_size=2, train_sizes=(64,), test_size=64,
              max_size=64, roi_batch_size=8, proposals=(20, 8), num_workers=0, device="cpu",
              checkpoint_every=1000, lr=0.01, backend="detectron2")  # fmt: skip
    results = run_detection(DetectionConfig(iters=2, **kw))
    progress_lines = [ln for ln in capsys.readouterr().err.splitlines() if "detection" in ln]
    assert progress_lines and "2/2" in progress_lines[-1] and "loss=" in progress_lines[-1]
    assert results["backend"] == "detectron2" and results["metric"] == "voc07-11point"
    assert all(0 <= results[k] <= 100 for k in ("AP", "AP50", "AP75"))
    assert results["initialised_fresh"] == HEADS  # the whole trunk came from the weights
    assert json.loads((out / "results.json").read_text())["method"] == "d2"
    row = (out / "table1_row.md").read_text()
    assert row == f"| d2 | {results['AP']:.1f} | {results['AP50']:.1f} | {results['AP75']:.1f} |\n"
    conf = json.loads((out / "detectron2_config.yaml").read_text())
    assert conf["MODEL"]["DEVICE"] == "cpu"
    assert conf["MODEL"]["ROI_HEADS"]["BATCH_SIZE_PER_IMAGE"] == 8
    assert json.loads((out / "run.json").read_text())["command"] == "transfer detection"
    assert (out / "detectron2" / "last_checkpoint").read_text() == "model_final.pth"
    with open(out / "metrics.csv", newline="") as fh:  # the same run-folder record as ours
        rows = list(csv.DictReader(fh))
    assert rows[-1]["iteration"] == "2" and float(rows[-1]["lr"]) > 0
    terms = [k for k in rows[-1] if k.startswith("loss_")]
    assert len(terms) == 4 and float(rows[-1]["loss"]) == pytest.approx(
        sum(float(rows[-1][k]) for k in terms)
    )
    with pytest.raises(UserError, match="a transfer detection run exists here"):
        run_detection(DetectionConfig(iters=2, **kw))
    with pytest.raises(UserError, match=r"changed settings \(iters 2 -> 3\)"):
        run_detection(DetectionConfig(iters=3, resume=True, **kw))
    again = run_detection(
        dataclasses.replace(DetectionConfig(iters=3, **kw), resume=True, allow_change=("iters",))
    )
    assert again["iterations"] == 3
    state = torch.load(out / "detectron2" / "model_final.pth", weights_only=False)
    assert state["iteration"] == 2  # detectron2 counts from 0: three iterations in all


def _msra_blobs(seed=0):
    """Random blobs under the MSRA R-50.pkl names, with what such files also carry."""
    rng = np.random.default_rng(seed)
    blobs = {"conv1_w": rng.normal(0, 0.1, (64, 3, 7, 7))}
    blobs["res_conv1_bn_s"], blobs["res_conv1_bn_b"] = (
        rng.uniform(0.5, 1.5, 64),
        rng.normal(0, 0.1, 64),
    )
    c_in = 64
    for stage, blocks, width in ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512)):
        for i in range(blocks):
            shapes = {"2a": (width, c_in, 1, 1), "2b": (width, width, 3, 3),
                      "2c": (4 * width, width, 1, 1)}  # fmt: skip
            if i == 0:
                shapes["1"] = (4 * width, c_in, 1, 1)
            for branch, shape in shapes.items():
                name = f"res{stage}_{i}_branch{branch}"
                blobs[f"{name}_w"] = rng.normal(0, (2 / np.prod(shape[1:])) ** 0.5, shape)
                blobs[f"{name}_bn_s"] = rng.uniform(0.5, 1.5, shape[0])
                blobs[f"{name}_bn_b"] = rng.normal(0, 0.1, shape[0])
            c_in = 4 * width
    blobs = {k: v.astype(np.float32) for k, v in blobs.items()}
    blobs["conv1_w_momentum"] = np.zeros((64, 3, 7, 7), np.float32)
    blobs["fc1000_w"], blobs["fc1000_b"] = np.zeros((1000, 2048), np.float32), np.zeros(1000)
    return blobs


@torch.no_grad()
def test_caffe2_msra_weights_read_as_detectron2_reads_them(tmp_path):
    from click.testing import CliRunner

    from pirl.weights import load_encoder
    from pirl_tools.main import main

    path = tmp_path / "R-50.pkl"
    path.write_bytes(pickle.dumps({"blobs": _msra_blobs()}, protocol=2))
    with pytest.raises(
        UserError, match=r"R-50\.pkl: Caffe2 \(MSRA\) weights put .* --format caffe2"
    ) as e:
        load_encoder(path)
    assert "\n" not in str(e.value)
    enc = load_encoder(path, fmt="caffe2")
    assert (enc.format, enc.arch, enc.width) == ("caffe2", "resnet50", 1.0)

    # detectron2's own Caffe2 loading into its backbone (BGR 0..255 minus the mean, std 1),
    # with the stride where torchvision has it, is the reference.
    d2 = _d2_model(tmp_path, _cfg(tmp_path), 3, **{
        "INPUT.FORMAT": "BGR", "MODEL.PIXEL_MEAN": [103.53, 116.28, 123.675],
        "MODEL.PIXEL_STD": [1.0, 1.0, 1.0]})  # fmt: skip
    DetectionCheckpointer(d2).load(str(path))
    _, _, rgb = _images()
    ref = d2.backbone(d2.preprocess_image([{"image": x.flip(0).float()} for x in rgb]).tensor)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (torch.stack(rgb).float() / 255 - mean.view(3, 1, 1)) / std.view(3, 1, 1)
    got = enc.trunk(x, ("res4",))["res4"]
    # Random blobs without BN statistics grow activations to ~1e6 by res4; folding the input
    # scale into conv1 reorders float32 sums, so the match is to 1e-4 relative, not 1e-6.
    assert (got - ref["res4"]).norm() / ref["res4"].norm() < 1e-3

    out = tmp_path / "r50.pth"
    res = CliRunner().invoke(main, ["weights", "convert", str(path), "--format", "caffe2",
                                    "--to", "torchvision", "-o", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    tv = torch.load(out, weights_only=True)
    assert torch.equal(tv["layer3.0.conv2.weight"], enc.trunk.layer3[0].conv2.weight)
    assert torch.equal(tv["bn1.running_var"], torch.full((64,), 1 - 1e-5))
