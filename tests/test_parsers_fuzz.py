"""Every parser of a user file, fed generated input: it reads what was written (the generator
is the reference) or stops with one line naming the file (and the line, where there is one);
never any other exception."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pirl.data import ImageList
from pirl.errors import UserError
from transfer.datasets import _inat18, _places205, voc07
from transfer.lowshot import read_split_file
from transfer.voc_ap import read_devkit_detections
from transfer.voc_detection import parse_annotation, read_voc_set

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure repeats
    suppress_health_check=[HealthCheck.too_slow],
)
NAME = st.text("abcdefghij0123456789_-", min_size=1, max_size=8)
# Whole lines of anything: unicode, control characters, lone surrogates excluded by UTF-8.
JUNK = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=30)


def one_line_about(exc: UserError, path: Path) -> None:
    message = str(exc)
    assert message.startswith(str(path)), message
    assert "\n" not in message and "Traceback" not in message, message


def lines_of(draw_lines: list[str | tuple]) -> str:
    return "".join(
        (" ".join(map(str, x)) if isinstance(x, tuple) else x) + "\n" for x in draw_lines
    )


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(NAME.map(lambda n: f"d/{n}.jpg"), st.integers(0, 300)),
            JUNK,
        ),
        max_size=12,
    ),
    st.binary(max_size=8),
)
def test_places205_lists(rows: list, tail: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        listing = root / "trainvalsplit_places205" / "val_places205.csv"
        listing.parent.mkdir()
        listing.write_bytes(lines_of(rows).encode() + tail)
        try:
            split = _places205(root, "val")
        except UserError as exc:
            one_line_about(exc, listing)
            return
        good = [r for r in rows if isinstance(r, tuple)]
        assert [p.relative_to(root).as_posix() for p in split.paths] == [p for p, _ in good]
        assert split.labels.tolist() == [y for _, y in good]


@FUZZ
@given(
    st.lists(NAME, min_size=1, max_size=6, unique=True),
    st.lists(st.one_of(st.sampled_from(["1", "0", "-1", " 1", "-1 "]), JUNK), max_size=8),
)
def test_voc07_class_files(ids: list[str], flags: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        main = Path(tmp) / "VOC2007" / "ImageSets" / "Main"
        main.mkdir(parents=True)
        (main / "test.txt").write_text("".join(f"{i}\n" for i in ids))
        rows = list(zip(ids, flags, strict=False))
        (main / "cat_test.txt").write_text("".join(f"{i} {f}\n" for i, f in rows))
        try:
            split = voc07(tmp, "test")
        except UserError as exc:
            one_line_about(exc, main)
            return
        assert len(rows) == len(ids)
        assert split.labels[:, 0].tolist() == [int(f) for _, f in rows]


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | NAME,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAME, inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 20), NAME, st.integers(0, 4)), max_size=6),
    st.one_of(st.none(), JSON_VALUE),
    st.sampled_from(["images", "annotations", "categories", None]),
)
def test_inat18_json(images: list, junk: object, spoiled: str | None) -> None:
    data = {
        "images": [{"id": i, "file_name": f"{n}.jpg"} for i, n, _ in images],
        "annotations": [{"image_id": i, "category_id": c} for i, _, c in images],
        "categories": [{"id": c, "name": f"c{c}"} for c in range(5)],
    }
    if spoiled is not None:
        data[spoiled] = junk
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train2018.json"
        path.write_text(json.dumps(data))
        try:
            split = _inat18(tmp, "train")
        except UserError as exc:
            one_line_about(exc, path)
            return
        by_id = {i: (n, c) for i, n, c in images}  # a repeated id: its last entry wins
        assert [p.name for p in split.paths] == [f"{n}.jpg" for n, _ in by_id.values()]
        if spoiled == "categories" and junk:
            return  # categories of the junk's making: only the files are known
        cats = range(5) if spoiled != "categories" else sorted({c for *_, c in images})
        index = {c: k for k, c in enumerate(cats)}  # no categories: those annotated, sorted
        assert split.labels.tolist() == [index[c] for _, c in by_id.values()]


@FUZZ
@given(st.binary(max_size=60) | JUNK.map(str.encode))
def test_inat18_json_bytes(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train2018.json"
        path.write_bytes(blob)
        try:
            _inat18(tmp, "train")
        except UserError as exc:
            one_line_about(exc, path)


NUMBER = st.one_of(
    st.integers(-5, 600).map(str),
    st.sampled_from(["inf", "-inf", "nan", "1e400", "0x10", "1_0", " 7 "]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    JUNK,
)


@FUZZ
@given(
    st.tuples(NUMBER, NUMBER),
    st.lists(st.tuples(NAME, NUMBER, NUMBER, NUMBER, NUMBER, st.sampled_from(["0", "1"]))),
    st.binary(max_size=6),
)
def test_voc_xml_annotations(size: tuple, objects: list, tail: bytes) -> None:
    e = [escape(v) for v in size]  # junk reaches the number parsing, not only the XML's
    body = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{escape(x1)}</xmin>"
        f"<ymin>{escape(y1)}</ymin><xmax>{escape(x2)}</xmax><ymax>{escape(y2)}</ymax></bndbox>"
        "</object>"
        for n, x1, y1, x2, y2, d in objects
    )
    xml = f"<annotation><size><width>{e[0]}</width><height>{e[1]}</height></size>{body}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.xml"
        path.write_bytes(xml.encode() + b"</annotation>" + tail)
        try:
            width, height, objs = parse_annotation(path)
        except UserError as exc:
            one_line_about(exc, path)
            return
        assert (width, height) == (int(float(size[0])), int(float(size[1])))
        assert [(o.name, o.difficult) for o in objs] == [(o[0], o[5] == "1") for o in objects]
        assert [o.box for o in objs] == [tuple(float(v) for v in o[1:5]) for o in objects]
        assert all(np.isfinite(o.box).all() for o in objs)


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["a", "b", "zz"]), NUMBER, NUMBER, NUMBER, NUMBER, NUMBER),
            JUNK,
        ),
        max_size=8,
    ),
    st.binary(max_size=4),
)
def test_devkit_detection_files(rows: list, tail: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "comp4_det_test_cat.txt"
        path.write_bytes(lines_of(rows).encode() + tail)
        try:
            dets = read_devkit_detections(tmp, ["cat"], ["a", "b"], "test")["cat"]
        except UserError as exc:
            one_line_about(exc, path)
            assert re.match(rf"{re.escape(str(path))}(:\d+)?: ", str(exc))
            return
        good = [r for r in rows if isinstance(r, tuple)]
        assert dets.image_ids == [r[0] for r in good]
        expected = np.array([[float(v) for v in r[1:]] for r in good]).reshape(-1, 5)
        assert np.array_equal(np.c_[dets.scores, dets.boxes], expected)
        assert np.isfinite(expected).all()


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["cat", "dog"]), st.sampled_from(["1.png", "2.png"])),
            JUNK,
        ),
        max_size=6,
    ),
    st.binary(max_size=4),
)
def test_lowshot_split_files(rows: list, tail: bytes) -> None:
    images = ImageList(
        Path("/data/train"),
        [Path(f"/data/train/{c}/{f}") for c in ("cat", "dog") for f in ("1.png", "2.png")],
        [0, 0, 1, 1],
        ["cat", "dog"],
    )
    lines = [f"{r[0]}/{r[1]}" if isinstance(r, tuple) else r for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.txt"
        path.write_bytes("".join(f"{x}\n" for x in lines).encode() + tail)
        try:
            subset = read_split_file(path, images)
        except UserError as exc:
            one_line_about(exc, path)
            return
        order = ["cat/1.png", "cat/2.png", "dog/1.png", "dog/2.png"]
        kept = [x.strip() for x in lines if x.strip() and not x.strip().startswith("#")]
        # a path names its image by its last two parts (class folder, file)
        keys = ["/".join([p for p in re.split(r"[/\\]", x) if p][-2:]) for x in kept]
        assert subset.indices == sorted(order.index(k) for k in keys)


@FUZZ
@given(st.lists(st.one_of(NAME, JUNK), max_size=6), st.binary(max_size=4))
def test_voc_detection_split_lists(rows: list[str], tail: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        main = Path(tmp) / "VOC2007" / "ImageSets" / "Main"
        main.mkdir(parents=True)
        listing = main / "test.txt"
        listing.write_bytes("".join(f"{r}\n" for r in rows).encode() + tail)
        (Path(tmp) / "VOC2007" / "Annotations").mkdir()
        for r in rows:
            if re.fullmatch(r"[a-j0-9_-]+", r):
                xml = "<annotation><size><width>9</width><height>9</height></size></annotation>"
                (Path(tmp) / "VOC2007" / "Annotations" / f"{r}.xml").write_text(xml)
        try:
            images = read_voc_set(tmp, "2007", "test", need_images=False)
        except UserError as exc:
            assert str(exc).startswith((str(listing), str(Path(tmp) / "VOC2007")))
            assert "\n" not in str(exc)
            return
        assert [im.image_id for im in images] == [r.split()[0] for r in rows if r.strip()]
