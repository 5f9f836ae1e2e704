import json
import shutil

import pandas as pd
import pytest

from pirl.errors import UserError
from pirl.tables import markdown_table
from transfer.datasets import build_embedded
from transfer.linear_probe import run_linear
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
    # A re-run into the same OUT is refused up front, and replaces the table with overwrite.
    with pytest.raises(UserError, match="a Table 2 exists here .*; pass --overwrite") as err:
        build_table2(["rnd=random:resnet18@0.125"], root, tmp_path / "out", device="cpu")
    assert "\n" not in str(err.value)
    again, _ = build_table2(
        ["rnd=random:resnet18@0.125"], root, tmp_path / "out", epochs=1, augment=False,
        device="cpu", overwrite=True,
    )  # fmt: skip
    assert again.equals(table)
    with pytest.raises(UserError, match="method 'a' given twice"):
        build_table2(["a=random:resnet18", "a=random:resnet50"], root, tmp_path / "o3")


def test_linear_into_an_existing_run_is_refused_and_replaced_with_overwrite(tmp_path):
    voc = build_embedded(tmp_path / "src", n=30)["voc07"]
    out = tmp_path / "run"
    kw = dict(data=voc, out=out, device="cpu", num_workers=0, image_size=32)
    first = run_linear("rnd=random:resnet18@0.125", "voc07", **kw)
    with pytest.raises(UserError, match="a transfer linear run exists here") as err:
        run_linear("rnd=random:resnet18@0.125", "voc07", seed=1, **kw)
    assert "\n" not in str(err.value)
    assert json.loads((out / "results.json").read_text())["value"] == first["value"]
    run_linear("rnd=random:resnet18@0.125", "voc07", seed=1, overwrite=True, **kw)
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "transfer linear" and run["invocations"][0]["method"] == "rnd"


def test_probe_against_untrained_writes_into_the_pretraining_run(tmp_path, tiny_folder):
    from pirl.trunk import build_trunk
    from pirl.weights import save_torchvision
    from transfer.linear_probe import probe_against_untrained

    split = tmp_path / "split"
    for i, p in enumerate(sorted(tiny_folder.rglob("*.png"))):
        dest = split / ("val" if i % 4 == 0 else "train") / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    run = tmp_path / "pretrain"
    run.mkdir()
    save_torchvision(build_trunk("resnet18", 0.125).state_dict(), run / "checkpoint.pth")
    config = {"val_data": str(split), "image_size": 32, "arch": "resnet18", "width": 0.125}
    (run / "config.json").write_text(json.dumps({**config, "method": "pirl"}))
    (run / "results.json").write_text(json.dumps({"knn_top1": 50.0}))
    results = probe_against_untrained(run, "cpu", 0)
    assert set(results) == {"knn_top1", "linear_top1", "random_linear_top1"}
    assert json.loads((run / "results.json").read_text()) == results
    assert not (run / "run.json").exists()  # no run folder of its own was claimed
