import dataclasses
import importlib.util
import json
import math
import pickle

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from pirl.errors import UserError
from pirl.trunk import build_trunk
from pirl.weights import from_detectron2, save_torchvision
from pirl_tools.main import main
from pirl_tools.transfer import parse_sizes, table1
from transfer.detection import (
    C4RoIAlign,
    DetectionConfig,
    Schedule,
    assemble_table1,
    build_c4_detector,
    detect,
    detectron2_config,
    run_detection,
    table1_markdown,
    write_detectron2_handover,
)
from transfer.voc_ap import evaluate
from transfer.voc_detection import (
    VocDetectionDataset,
    build_embedded_voc,
    ground_truth,
    read_voc_set,
    voc_classes,
)


def detector_trunk_state(model) -> dict[str, torch.Tensor]:
    """The trunk's weights as the detector holds them, under torchvision names."""
    return {**model.backbone.state_dict(), **model.roi_heads.box_head.state_dict()}


def _randomised_trunk(arch="resnet18", width=0.125, seed=0):
    """A trunk whose BN statistics and affine are far from the defaults, so copying shows."""
    torch.manual_seed(seed)
    trunk = build_trunk(arch, width)
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return trunk.eval()


def test_r50_c4_shapes():
    torch.manual_seed(0)
    model = build_c4_detector(build_trunk("resnet50"), num_classes=20)
    feats = model.backbone(torch.rand(1, 3, 64, 96))
    assert list(feats) == ["res4"] and feats["res4"].shape == (1, 1024, 4, 6)
    assert model.backbone.out_channels == 1024
    boxes = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 20.0, 90.0, 60.0]])]
    pooled = model.roi_heads.box_roi_pool(feats, boxes, [(64, 96)])
    assert pooled.shape == (2, 1024, 14, 14)
    assert model.roi_heads.box_head(pooled).shape == (2, 2048)
    pred = model.roi_heads.box_predictor
    assert pred.cls_score.out_features == 21 and pred.bbox_pred.out_features == 84
    gen = model.rpn.anchor_generator
    assert gen.sizes == ((32, 64, 128, 256, 512),) and gen.num_anchors_per_location() == [15]


def test_anchors_are_detectrons_cell_anchors_not_rounded():
    # detectron2's DefaultAnchorGenerator: width sqrt(size^2 / ratio), height ratio * width,
    # centred on 0; torchvision rounds these to whole pixels (size 32, ratio 0.5: 45.25 -> 46).
    gen = build_c4_detector(build_trunk("resnet18", 0.125), 3).rpn.anchor_generator
    want = []
    for r in (0.5, 1.0, 2.0):  # torchvision's order: ratio-major
        for s in (32, 64, 128, 256, 512):
            w = math.sqrt(s * s / r)
            want.append([-w / 2, -r * w / 2, w / 2, r * w / 2])
    assert torch.allclose(gen.cell_anchors[0], torch.tensor(want), rtol=0, atol=1e-4)


def test_roi_align_is_half_pixel_aligned():
    # On a feature map whose value is the column index, an aligned RoIAlign bin averages to
    # the column of its centre minus half a pixel: box x1=64 at stride 16 starts at column 4,
    # bins are one cell wide, so bin k is centred at 4 + k + 0.5 - 0.5 = 4 + k.
    ramp = torch.arange(32.0).expand(1, 1, 32, 32).contiguous()
    box = torch.tensor([[64.0, 64.0, 64.0 + 16 * 14, 64.0 + 16 * 14]])
    out = C4RoIAlign()({"res4": ramp}, [box], [(512, 512)])
    assert torch.allclose(out[0, 0, 0], 4 + torch.arange(14.0), atol=1e-5)


def test_backbone_holds_exactly_the_encoders_weights(tmp_path):
    from pirl.weights import load_encoder

    trunk = _randomised_trunk()
    path = save_torchvision(trunk.state_dict(), tmp_path / "enc.pth")
    enc = load_encoder(path)
    model = build_c4_detector(enc.trunk, num_classes=3)
    got = detector_trunk_state(model)
    want = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert isinstance(enc.trunk.bn1, nn.BatchNorm2d)  # the encoder itself is left untouched


def test_batchnorm_frozen_and_stem_res2_frozen():
    trunk = _randomised_trunk(seed=1)
    model = build_c4_detector(trunk, 3, (64,), 64, 64, roi_batch_size=16, proposals=(50, 20))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in trunk.modules()
    )
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    names = [n for n, _ in model.backbone.named_parameters()]
    assert frozen == {n for n in names if n.startswith(("conv1", "layer1"))}
    assert all(p.requires_grad for p in model.roi_heads.box_head.parameters())
    # In training mode the frozen backbone computes what the trunk computes in eval mode.
    x = torch.rand(2, 3, 64, 64)
    model.train()
    with torch.no_grad():
        assert torch.allclose(model.backbone(x)["res4"], trunk(x, ("res4",))["res4"], atol=1e-5)
    before = {k: v.clone() for k, v in detector_trunk_state(model).items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 50.0]]), "labels": torch.tensor([2])}] * 2
    sum(model(list(x), targets).values()).backward()
    opt.step()
    after = detector_trunk_state(model)
    assert torch.equal(after["conv1.weight"], before["conv1.weight"])
    assert torch.equal(after["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    assert torch.equal(after["layer3.0.bn1.running_mean"], before["layer3.0.bn1.running_mean"])
    assert not torch.equal(after["layer3.0.conv1.weight"], before["layer3.0.conv1.weight"])


def test_schedule_scaling_and_warmup():
    s = Schedule.scaled()
    assert (s.iters, s.batch_size, s.base_lr) == (25000, 16, 0.002)
    assert (s.steps, s.warmup) == ((17000,), 1000)
    assert s.lr(0) == pytest.approx(0.002 * 0.001)
    assert s.lr(500) == pytest.approx(0.002 * (0.001 * 0.5 + 0.5))
    assert s.lr(1000) == s.lr(16999) == pytest.approx(0.002)
    assert s.lr(17000) == pytest.approx(0.0002)
    small = Schedule.scaled(iters=1000, batch_size=4)
    assert (small.base_lr, small.steps, small.warmup) == (pytest.approx(0.0005), (680,), 40)
    with pytest.raises(UserError):
        Schedule.scaled(iters=0)
    assert parse_sizes("480-800:32") == tuple(range(480, 801, 32))
    assert parse_sizes("96,128") == (96, 128)


def test_detectron2_handover(tmp_path):
    trunk = _randomised_trunk("resnet50", 1.0, seed=2)
    cfg = DetectionConfig(out=str(tmp_path), iters=5000, batch_size=8)
    yaml_path, pkl = write_detectron2_handover(cfg, trunk, 20)
    conf = json.loads(yaml_path.read_text())  # JSON is YAML: detectron2's merge_from_file reads it
    m = conf["MODEL"]
    assert m["RESNETS"] == {"DEPTH": 50, "OUT_FEATURES": ["res4"], "NORM": "FrozenBN",
                            "STRIDE_IN_1X1": False}  # fmt: skip
    assert m["BACKBONE"]["FREEZE_AT"] == 2 and m["ROI_HEADS"]["NAME"] == "Res5ROIHeads"
    assert m["ROI_HEADS"]["NUM_CLASSES"] == 20 and m["WEIGHTS"] == str(pkl.resolve())
    assert m["ROI_BOX_HEAD"] == {"POOLER_RESOLUTION": 14, "POOLER_SAMPLING_RATIO": 0,
                                 "POOLER_TYPE": "ROIAlignV2"}  # fmt: skip
    assert m["PIXEL_MEAN"] == pytest.approx([123.675, 116.28, 103.53])
    assert conf["INPUT"]["FORMAT"] == "RGB" and conf["INPUT"]["MIN_SIZE_TEST"] == 800
    assert conf["INPUT"]["MIN_SIZE_TRAIN"] == list(range(480, 801, 32))
    sol = conf["SOLVER"]
    assert (sol["IMS_PER_BATCH"], sol["MAX_ITER"]) == (8, 5000)
    assert (sol["STEPS"], sol["WARMUP_ITERS"]) == ([3400], 200)
    assert sol["BASE_LR"] == pytest.approx(0.001)
    assert conf["DATASETS"]["TEST"] == ["pirl_voc_2007_test"]
    with open(pkl, "rb") as fh:
        d2 = pickle.load(fh)
    assert d2["matching_heuristics"] is True
    assert "res5.2.conv3.weight" in d2["model"] and "stem.conv1.norm.running_var" in d2["model"]
    back = from_detectron2(d2["model"])
    want = {k: v for k, v in trunk.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert set(back) == set(want) and all(torch.equal(back[k], want[k]) for k in want)
    small = dataclasses.replace(cfg, device="cpu", roi_batch_size=16, proposals=(30, 10))
    m = detectron2_config(small, pkl, "resnet50", 20)["MODEL"]
    assert m["DEVICE"] == "cpu" and m["ROI_HEADS"]["BATCH_SIZE_PER_IMAGE"] == 16
    assert (m["RPN"]["POST_NMS_TOPK_TRAIN"], m["RPN"]["POST_NMS_TOPK_TEST"]) == (30, 10)
    with pytest.raises(UserError, match="bottleneck"):
        write_detectron2_handover(cfg, build_trunk("resnet18"), 20)
    with pytest.raises(UserError, match="full-width"):
        write_detectron2_handover(cfg, build_trunk("resnet50", 0.25), 20)


# VISSL configs/config/benchmark/object_detection/voc0712/pirl_npid/rn50_transfer_voc0712_npid_pirl
# .yaml (WARMUP_ITERS 1000, BASE_LR 0.002) over its base iccv19/rn50_transfer_voc0712_detectron2_e2e
# (STEPS (17000,), MAX_ITER 25000, IMS_PER_BATCH 16); the rest is detectron2's defaults.
VISSL_PIRL_VOC0712_SOLVER = {
    "IMS_PER_BATCH": 16, "BASE_LR": 0.002, "STEPS": [17000], "MAX_ITER": 25000,
    "WARMUP_ITERS": 1000, "WARMUP_FACTOR": 0.001, "GAMMA": 0.1, "MOMENTUM": 0.9,
    "WEIGHT_DECAY": 0.0001,
}  # fmt: skip


def test_default_schedule_is_vissls_pirl_voc0712_for_both_backends(tmp_path):
    cfg = DetectionConfig(data=str(tmp_path), out=str(tmp_path))
    sched = cfg.schedule()  # what the torchvision backend trains with
    assert sched == Schedule()
    for it, lr in [(0, 0.002 * 0.001), (999, 0.002 * (0.001 + 0.999 * 0.999)), (1000, 0.002),
                   (16999, 0.002), (17000, 0.0002), (24999, 0.0002)]:  # fmt: skip
        assert sched.lr(it) == pytest.approx(lr, rel=1e-12)
    yaml_path, _ = write_detectron2_handover(cfg, _randomised_trunk("resnet50", 1.0), 20)
    solver = json.loads(yaml_path.read_text())["SOLVER"]
    assert {k: solver[k] for k in VISSL_PIRL_VOC0712_SOLVER} == VISSL_PIRL_VOC0712_SOLVER
    rpn = json.loads(yaml_path.read_text())["MODEL"]["RPN"]
    assert (rpn["PRE_NMS_TOPK_TEST"], rpn["POST_NMS_TOPK_TEST"]) == (6000, 1000)


@pytest.mark.skipif(importlib.util.find_spec("detectron2") is not None, reason="detectron2 present")
def test_detectron2_backend_missing_says_how_to_install(tmp_path):
    cfg = DetectionConfig(out=str(tmp_path / "run"), backend="detectron2")
    with pytest.raises(UserError, match="pip install") as err:
        run_detection(cfg)
    assert "\n" not in str(err.value)


def test_detectron2_backend_claims_the_run_folder(tmp_path, monkeypatch):
    import importlib.util

    from pirl.engine import RunDir

    devkit = build_embedded_voc(n_trainval=2, n_test=2, size=64, seed=1)
    out = tmp_path / "run"
    RunDir(out).start("transfer lowshot", {"lr": 0.1}, torch.device("cpu"))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "detectron2" else real(n, *a)
    )
    cfg = DetectionConfig(
        out=str(out),
        data=str(devkit),
        train_sets=("2007/trainval",),
        device="cpu",
        backend="detectron2",
    )
    with pytest.raises(UserError, match="holds a `transfer lowshot` run"):
        run_detection(cfg)
    with pytest.raises(UserError, match=r"detectron2[/\\]last_checkpoint: nothing to resume"):
        run_detection(dataclasses.replace(cfg, out=str(tmp_path / "new"), resume=True))


def test_tiny_end_to_end_resume_and_rescore(tmp_path):
    devkit = build_embedded_voc(n_trainval=4, n_test=3, size=64, seed=1)
    weights = save_torchvision(_randomised_trunk().state_dict(), tmp_path / "enc.pth")
    out = tmp_path / "run"
    kw = dict(data=str(devkit), weights=str(weights), name="tiny", out=str(out),
              train_sets=("2007/trainval",), batch_size=2, train_sizes=(64,), test_size=64,
              max_size=64, roi_batch_size=8, proposals=(20, 8), num_workers=0, device="cpu",
              checkpoint_every=1, lr=0.01)  # fmt: skip
    results = run_detection(DetectionConfig(iters=2, **kw))
    assert results["method"] == "tiny" and results["metric"] == "voc07-11point"
    assert all(0 <= results[k] <= 100 for k in ("AP", "AP50", "AP75"))
    assert results["AP50"] >= results["AP75"]
    assert (out / "table1_row.md").read_text().startswith("| tiny | ")
    # config.json holds one option per key (a --config file), no nested schedule.
    config = json.loads((out / "config.json").read_text())
    assert (config["iters"], config["batch_size"], config["lr"]) == (2, 2, 0.01)
    assert config["data"] == str(devkit) and config["name"] == "tiny"
    assert not any(isinstance(v, dict) for v in config.values())
    assert json.loads((out / "run.json").read_text())["command"] == "transfer detection"
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 2
    # The devkit files written by the run score to the same numbers through the CLI.
    res = CliRunner().invoke(main, ["eval", "voc-detections", "--data", str(devkit),
                                    "--detections", str(out / "detections")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"AP50 {results['AP50']:.1f}" in res.output
    # A second run into the folder, or a resume with other settings, is refused naming each.
    with pytest.raises(UserError, match="a transfer detection run exists here"):
        run_detection(DetectionConfig(iters=2, **kw))
    with pytest.raises(UserError, match=r"changed settings \(iters 2 -> 3, lr 0\.01 -> 0\.02\)"):
        run_detection(DetectionConfig(iters=3, resume=True, **{**kw, "lr": 0.02}))
    # Resume continues from iteration 2 of checkpoint.pth instead of starting over.
    run_detection(DetectionConfig(iters=3, resume=True, allow_change=("iters",), **kw))
    lines = (out / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines[1:]] == ["2", "3"]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["iteration"] == 3
    table = assemble_table1([out])
    assert table.Method.tolist() == ["tiny"] and "| tiny |" in table1_markdown(table)
    res = CliRunner().invoke(table1, [str(out), "--out", str(tmp_path / "tables")])
    assert res.exit_code == 0 and (tmp_path / "tables" / "table1.csv").exists()


class _Oracle(nn.Module):
    """Returns each image's training targets as detections: a perfect detector."""

    def __init__(self, dataset):
        super().__init__()
        self.targets = {tuple(img.shape) + (float(img.sum()),): t for img, t, _ in dataset}

    def forward(self, images):
        outs = []
        for img in images:
            t = self.targets[tuple(img.shape) + (float(img.sum()),)]
            n = len(t["labels"])
            outs.append({"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(n)})
        return outs


def test_detect_returns_devkit_coordinates_a_perfect_detector_scores_100():
    devkit = build_embedded_voc(n_trainval=2, n_test=5, size=64, seed=4)
    images = read_voc_set(devkit, "2007", "test")
    classes = voc_classes(images)
    oracle = _Oracle(VocDetectionDataset(images, classes, train=False))
    dets = detect(oracle, images, classes, torch.device("cpu"), batch_size=2, num_workers=0)
    got = sorted(
        (i, tuple(b))
        for c in classes
        for i, b in zip(dets[c].image_ids, dets[c].boxes.tolist(), strict=True)
    )
    want = sorted((im.image_id, o.box) for im in images for o in im.objects)
    assert got == want  # x1, y1 shifted back by one pixel: exactly the XML's integers
    res = evaluate(ground_truth(images, classes), dets, classes)
    assert res["AP"] == res["AP50"] == res["AP75"] == pytest.approx(100.0)


def test_cli_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(main, ["eval", "voc-detections", "--data", str(tmp_path / "nope"),
                                    "--detections", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 2 and "error:" in res.output and "nope" in res.output
    with pytest.raises(UserError, match="no results.json"):
        assemble_table1([tmp_path])


def test_missing_voc_images_are_counted_before_training(tmp_path):
    """All missing JPEGs of a split in one line, before any model is built."""
    import shutil

    devkit = tmp_path / "VOCdevkit"
    shutil.copytree(build_embedded_voc(n_trainval=2, n_test=5, size=64, seed=4), devkit)
    jpegs = sorted((devkit / "VOC2007" / "JPEGImages").glob("*.jpg"))
    test_ids = (devkit / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()
    gone = [devkit / "VOC2007" / "JPEGImages" / f"{i}.jpg" for i in test_ids[:4]]
    for p in gone:
        p.unlink()
    assert len(jpegs) == 7
    with pytest.raises(UserError) as info:
        read_voc_set(devkit, "2007", "test")
    assert str(info.value).startswith(f"{devkit / 'VOC2007' / 'ImageSets' / 'Main' / 'test.txt'}")
    assert f"4 of 5 listed images are missing: {gone[0]}, " in str(info.value)
    assert str(info.value).endswith(" and 1 more")
