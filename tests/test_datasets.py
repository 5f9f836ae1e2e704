import json

import numpy as np
import pytest

from pirl.data import embedded_images
from pirl.errors import UserError
from transfer.datasets import BENCHMARKS, SPLITS, build_embedded, load_split, voc_labels


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return build_embedded(tmp_path_factory.mktemp("bench"), n=45)


def test_every_layout_reads_back_the_packaged_labels(roots):
    _, digits = embedded_images(32)
    for b in BENCHMARKS:
        for s in SPLITS[b]:
            split = load_split(b, roots[b], s)
            idx = np.array([int(p.stem) for p in split.paths])
            assert (idx % 3 == 0).all() == (s in ("test", "val"))
            assert all(p.is_file() for p in split.paths)
            assert split.classes == [f"digit{d}" for d in range(10)]
            if b == "voc07":
                assert split.labels.shape == (len(idx), 10)
                # exactly one non-negative entry per row, at the image's digit
                assert ((split.labels >= 0).sum(1) == 1).all()
                np.testing.assert_array_equal(split.labels.argmax(1), digits[idx])
            else:
                np.testing.assert_array_equal(split.labels, digits[idx])


def test_voc_reads_devkit_flags_and_root_variants(tmp_path):
    main = tmp_path / "VOC2007" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "test.txt").write_text("000001\n000002\n000003\n")
    (main / "cat_test.txt").write_text("000001  1\n000002  0\n000003 -1\n")
    (main / "dog_test.txt").write_text("000003  1\n000001 -1\n000002 -1\n")
    (tmp_path / "VOC2007" / "JPEGImages").mkdir()
    for i in (1, 2, 3):
        (tmp_path / "VOC2007" / "JPEGImages" / f"00000{i}.jpg").touch()
    split = load_split("voc07", tmp_path, "test")
    assert split.classes == ["cat", "dog"]
    np.testing.assert_array_equal(split.labels, [[1, -1], [0, -1], [-1, 1]])
    assert split.paths[0] == tmp_path / "VOC2007" / "JPEGImages" / "000001.jpg"
    (main / "dog_test.txt").write_text("000003  1\n000001 2\n")
    with pytest.raises(UserError, match=r"dog_test.txt:2: expected"):
        load_split("voc07", tmp_path, "test")
    (main / "dog_test.txt").write_text("000003  1\n000001 -1\n")
    with pytest.raises(UserError, match=r"dog_test.txt: no label for image 000002"):
        load_split("voc07", tmp_path, "test")
    with pytest.raises(UserError, match=r"trainval.txt: file not found"):
        load_split("voc07", tmp_path, "trainval")
    with pytest.raises(UserError, match="no VOC2007/ImageSets/Main"):
        load_split("voc07", tmp_path / "nothing", "test")


def test_places_errors_name_file_and_line(roots, tmp_path):
    listing = roots["places205"] / "trainvalsplit_places205" / "val_places205.csv"
    bad = tmp_path / "p"
    (bad / "trainvalsplit_places205").mkdir(parents=True)
    lines = listing.read_text().splitlines()
    lines[2] = lines[2].split()[0]
    (bad / "trainvalsplit_places205" / "val_places205.csv").write_text("\n".join(lines))
    with pytest.raises(UserError, match=r"val_places205.csv:3: expected"):
        load_split("places205", bad, "val")
    with pytest.raises(UserError, match=r"train_places205.csv: file not found"):
        load_split("places205", bad, "train")


def test_inat_errors(roots, tmp_path):
    (tmp_path / "train2018.json").write_text("{not json")
    with pytest.raises(UserError, match=r"train2018.json: not valid JSON"):
        load_split("inat18", tmp_path, "train")
    data = json.loads((roots["inat18"] / "train2018.json").read_text())
    data["annotations"][0]["category_id"] = 99
    (tmp_path / "train2018.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"train2018.json: image \d+ has unknown category 99"):
        load_split("inat18", tmp_path, "train")
    del data["annotations"][0]["category_id"]
    (tmp_path / "train2018.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"train2018.json: missing key 'category_id'"):
        load_split("inat18", tmp_path, "train")
    with pytest.raises(UserError, match=r"val2018.json: file not found"):
        load_split("inat18", tmp_path, "val")


def test_imagenet_val_class_must_exist_in_train(roots, tmp_path):
    import shutil

    shutil.copytree(roots["imagenet"], tmp_path / "in")
    (tmp_path / "in" / "val" / "digit0").rename(tmp_path / "in" / "val" / "zebra")
    with pytest.raises(UserError, match="class folder 'zebra'"):
        load_split("imagenet", tmp_path / "in", "val")
    with pytest.raises(UserError, match="does not exist"):
        load_split("imagenet", tmp_path / "missing", "val")
    with pytest.raises(UserError, match="unknown benchmark"):
        load_split("coco", tmp_path, "val")


# VISSL extra_scripts/datasets/create_voc_data_files.py writes <split>_labels.npy from the
# devkit files with -1 (absent) -> 0 and 0 (difficult) -> -1; 1 stays.
DEVKIT_TO_VISSL = {1: 1, 0: -1, -1: 0}


def test_voc_labels_reads_vissl_files_back_into_the_devkit_encoding(roots):
    devkit = load_split("voc07", roots["voc07"], "trainval").labels
    assert (devkit == 0).any() and (devkit == -1).any()  # all three values occur
    vissl = np.vectorize(DEVKIT_TO_VISSL.get)(devkit).astype(np.int32)
    back = voc_labels(vissl, "vissl")
    np.testing.assert_array_equal(back, devkit)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(voc_labels(devkit, "devkit"), devkit)
    # read with the wrong encoding, each file has more "difficult" than "absent" entries
    with pytest.raises(UserError, match=r"y.npy: .* --label-encoding vissl"):
        voc_labels(vissl, "devkit", "y.npy")
    with pytest.raises(UserError, match=r"--label-encoding devkit"):
        voc_labels(devkit, "vissl")
    with pytest.raises(UserError, match="unknown label encoding"):
        voc_labels(devkit, "pascal")


@pytest.mark.parametrize("benchmark", ["voc07", "places205", "inat18"])
def test_missing_listed_images_are_counted_before_any_compute(roots, tmp_path, benchmark):
    """Every image a split lists must exist: all missing counted, the first three named (an
    ImageNet folder lists only the files that are there)."""
    import shutil

    shutil.copytree(roots[benchmark], tmp_path / benchmark)
    split = SPLITS[benchmark][1]
    listed = load_split(benchmark, tmp_path / benchmark, split).paths
    for p in listed[:5]:
        p.unlink()
    with pytest.raises(UserError) as info:
        load_split(benchmark, tmp_path / benchmark, split)
    message = str(info.value)
    assert f"5 of {len(listed)} listed images are missing: {listed[0]}, " in message
    assert message.endswith(" and 2 more") and "\n" not in message
