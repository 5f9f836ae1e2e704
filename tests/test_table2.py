import shutil

import pandas as pd
import pytest

from pirl.tables import markdown_table
from transfer.datasets import build_embedded
from transfer.table2 import assemble, build_table2, find_benchmarks


def test_assemble_paper_layout_with_gaps():
    results = [
        {"method": "pirl", "parameters": 25_557_032, "benchmark": "voc07", "value": 81.14},
        {"method": "pirl", "parameters": 25_557_032, "benchmark": "imagenet", "value": 63.56},
        {"method": "random", "parameters": 700_000, "benchmark": "voc07", "value": 13.66},
    ]
    table = assemble(results)
    assert list(table.columns) == [
        "Method",
        "Parameters",
        "ImageNet",
        "VOC07",
        "Places205",
        "iNat.",
    ]
    assert table.iloc[0].tolist() == ["pirl", "25.6M", 63.6, 81.1, "-", "-"]
    assert table.iloc[1].tolist() == ["random", "0.7M", "-", 13.7, "-", "-"]
    md = markdown_table(table).splitlines()
    assert md[0] == "| Method | Parameters | ImageNet | VOC07 | Places205 | iNat. |"
    assert md[3] == "| random | 0.7M | - | 13.7 | - | - |"


def test_find_benchmarks_reports_why_each_is_skipped(tmp_path):
    roots = build_embedded(tmp_path / "src", n=30)
    root = tmp_path / "root"
    shutil.copytree(roots["voc07"], root / "voc07")
    shutil.copytree(roots["inat18"], root / "inat18")
    (root / "inat18" / "val2018.json").write_text("{")
    found, skipped = find_benchmarks(root)
    assert list(found) == ["voc07"]
    assert skipped[0] == f"ImageNet: skipped, no folder {root / 'imagenet'}"
    assert skipped[2].startswith("iNat.: skipped,") and "val2018.json: not valid JSON" in skipped[2]
    assert len(skipped) == 3


def test_table2_end_to_end_on_present_data(tmp_path):
    roots = build_embedded(tmp_path / "src", n=45)
    root = tmp_path / "root"
    shutil.copytree(roots["voc07"], root / "voc07")
    shutil.copytree(roots["imagenet"], root / "imagenet")
    table, notes = build_table2(
        ["rnd=random:resnet18@0.125"], root, tmp_path / "out", epochs=1, augment=False, device="cpu"
    )
    csv = pd.read_csv(tmp_path / "out" / "table2.csv")
    assert csv["Method"].tolist() == ["rnd"]
    assert 0 < csv["VOC07"][0] <= 100 and 0 <= csv["ImageNet"][0] <= 100
    assert csv["Places205"].tolist() == ["-"]
    md = (tmp_path / "out" / "table2.md").read_text()
    assert "| rnd | 0.2M |" in md and "- Places205: skipped, no folder" in md
    assert (tmp_path / "out" / "runs" / "rnd" / "voc07" / "results.json").is_file()
    with pytest.raises(Exception, match="unknown architecture"):
        build_table2(["x=random:vgg16"], root, tmp_path / "out2", device="cpu")
