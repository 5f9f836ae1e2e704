import numpy as np
import pytest
import torch

from pirl.errors import UserError
from transfer.voc_detection import (
    VocDetectionDataset,
    build_embedded_voc,
    embedded_detection_images,
    ground_truth,
    parse_annotation,
    parse_set_name,
    read_voc_set,
    voc_classes,
)

GOOD = """<annotation><filename>x.jpg</filename>
<size><width>100</width><height>50</height><depth>3</depth></size>
<object><name>dog</name><difficult>0</difficult>
<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>100</xmax><ymax>50</ymax></bndbox></object>
<object><name>cat</name><difficult>1</difficult>
<bndbox><xmin>10</xmin><ymin>20</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>
</annotation>"""


@pytest.fixture
def devkit(tmp_path, monkeypatch):
    monkeypatch.setenv("PIRL_TOOLS_CACHE", str(tmp_path / "cache"))
    return build_embedded_voc(n_trainval=8, n_test=4, size=96, seed=3)


def test_parse_annotation(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(GOOD)
    w, h, objs = parse_annotation(p)
    assert (w, h) == (100, 50)
    assert [(o.name, o.box, o.difficult) for o in objs] == [
        ("dog", (1.0, 2.0, 100.0, 50.0), False),
        ("cat", (10.0, 20.0, 30.0, 40.0), True),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD[:-20], "malformed XML"),
        (GOOD.replace("<xmax>100</xmax>", "<xmax>101</xmax>"), "outside the 100x50 image"),
        (GOOD.replace("<ymin>2</ymin>", "<ymin>-3</ymin>"), "outside"),
        (GOOD.replace("<xmin>10</xmin>", "<xmin>31</xmin>"), "inverted"),
        (GOOD.replace("<name>dog</name>", ""), "missing <name>"),
        (GOOD.replace("<ymax>40</ymax>", "<ymax>forty</ymax>"), "<ymax> is 'forty'"),
        (GOOD.replace("<size>", "<sz>").replace("</size>", "</sz>"), "missing <size>"),
    ],
)
def test_parse_annotation_errors_name_the_file(tmp_path, text, message):
    p = tmp_path / "bad_annotation.xml"
    p.write_text(text)
    with pytest.raises(UserError, match="bad_annotation.xml") as err:
        parse_annotation(p)
    assert message in str(err.value)


def test_embedded_devkit_roundtrip(devkit):
    assert parse_set_name("2007/trainval") == ("2007", "trainval")
    train, test = read_voc_set(devkit, "2007", "trainval"), read_voc_set(devkit, "2007", "test")
    assert len(train) == 8 and len(test) == 4
    # The XML written holds exactly the boxes the generator drew.
    made = embedded_detection_images(12, 96, 3)
    for im, (img, objs) in zip(train + test, made, strict=True):
        assert (im.width, im.height) == (img.shape[1], img.shape[0]) == (96, 96)
        assert [(o.name, o.box, o.difficult) for o in im.objects] == [
            (o.name, o.box, o.difficult) for o in objs
        ]
    classes = voc_classes(train + test)
    assert all(c.startswith("digit") for c in classes) and classes == sorted(classes)
    gt = ground_truth(test, classes)
    assert sum(len(g.boxes) for c in classes for g in gt[c].values()) == sum(
        len(im.objects) for im in test
    )
    assert all(set(gt[c]) == {im.image_id for im in test} for c in classes)


def test_embedded_boxes_frame_the_ink():
    # Independent check of the boxes: the digit's colour differs from the dimmed photo
    # mostly inside its box, so the box holds most changed pixels of a one-digit image.
    for img, objs in embedded_detection_images(20, 96, 5):
        if len(objs) != 1:
            continue
        x1, y1, x2, y2 = (int(v) for v in objs[0].box)
        inside = img[y1 - 1 : y2, x1 - 1 : x2].std(axis=(0, 1)).mean()
        assert 2 <= x2 - x1 + 1 <= 96 * 0.45 and inside > 5


def test_split_errors_name_the_file(devkit):
    with pytest.raises(UserError, match="val.txt: split list does not exist"):
        read_voc_set(devkit, "2007", "val")
    (devkit / "VOC2007" / "JPEGImages" / "000009.jpg").unlink()
    with pytest.raises(UserError, match=r"test.txt: 1 of 4 listed images are missing: .*09.jpg"):
        read_voc_set(devkit, "2007", "test")
    (devkit / "VOC2007" / "Annotations" / "000001.xml").write_text("<annotation>")
    with pytest.raises(UserError, match="000001.xml: malformed XML"):
        read_voc_set(devkit, "2007", "trainval")
    with pytest.raises(UserError, match="YEAR/SPLIT"):
        parse_set_name("2007")


def test_dataset_targets_and_flip(devkit):
    images = read_voc_set(devkit, "2007", "trainval")
    classes = voc_classes(images)
    plain = VocDetectionDataset(images, classes, train=False)
    img, target, idx = plain[2]
    im = images[2]
    assert img.shape == (3, 96, 96) and 0 <= img.min() and img.max() <= 1 and idx == 2
    want = torch.tensor([o.box for o in im.objects]) - torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert torch.equal(target["boxes"], want)
    assert target["labels"].tolist() == [classes.index(o.name) + 1 for o in im.objects]
    torch.manual_seed(0)
    flips = []
    for _ in range(16):
        fimg, ftarget, _ = VocDetectionDataset(images, classes, train=True)[2]
        flipped = not torch.equal(fimg, img)
        flips.append(flipped)
        if flipped:
            assert torch.equal(fimg, img.flip(-1))
            # A box's pixels in the flipped image are the mirrored pixels of the original box.
            for b, fb in zip(target["boxes"].int(), ftarget["boxes"].int(), strict=True):
                orig = img[:, b[1] : b[3], b[0] : b[2]]
                mirr = fimg[:, fb[1] : fb[3], fb[0] : fb[2]].flip(-1)
                assert torch.equal(orig, mirr)
    assert 0 < sum(flips) < 16


def test_dataset_rejects_size_mismatch_and_unknown_class(devkit):
    images = read_voc_set(devkit, "2007", "test")
    images[0].width = 50
    with pytest.raises(UserError, match="is 96x96 but 000008.xml says 50x96"):
        VocDetectionDataset(images, ["digit0"] + voc_classes(images), train=False)[0]
    with pytest.raises(UserError, match="is not one of"):
        VocDetectionDataset(images, ["cat"], train=False)
    assert np.all([o.box[2] <= 96 for im in images for o in im.objects])
