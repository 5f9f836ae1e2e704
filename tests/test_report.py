"""report.md: each of the paper's claims judged from the files the commands wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis.report import LAYERS, write_report
from pirl.errors import UserError


def outputs(root: Path, jigsaw_res5: float, pirl_ratio: float) -> Path:
    """The files `make paper-small` leaves, with chosen numbers."""
    table = pd.DataFrame(
        {
            "Method": ["pirl", "npid", "jigsaw", "random"],
            "Parameters": ["0.7M"] * 4,
            "ImageNet": [40.0, 35.0, 30.0, 20.0],
            "VOC07": [30.0, 31.0, 25.0, 15.0],
            "Places205": ["-"] * 4,
            "iNat.": ["-"] * 4,
        }
    )
    (root / "table2").mkdir(parents=True)
    table.to_csv(root / "table2" / "table2.csv", index=False)
    for i, layer in enumerate(LAYERS):
        t = table.copy()
        t["ImageNet"] = [10.0 + 5 * i, 9.0 + 4 * i, [20, 25, 30, 35, jigsaw_res5][i], 10.0]
        (root / "layers" / layer).mkdir(parents=True)
        t.to_csv(root / "layers" / layer / "table2.csv", index=False)
    inv = pd.DataFrame(
        {
            "model": ["pirl", "pirl", "jigsaw"],
            "layer": ["res5", "f-g", "res5"],
            "own_mean": [0.5, 0.5, 0.9],
            "other_mean": [1.0, 1.0, 1.0],
            "ratio": [pirl_ratio, pirl_ratio, 0.9],
            "self_match": [0.3, 0.2, 0.05],
        }
    )
    (root / "invariance").mkdir()
    inv.to_csv(root / "invariance" / "invariance.csv", index=False)
    (root / "invariance" / "results.json").write_text(json.dumps({"images": 100}))
    (root / "pirl").mkdir()
    results = {"final_loss": 5.0, "chance_loss": 6.9, "knn_top1": 30.0, "random_knn_top1": 15.0}
    results |= {"final_patch_loss": 5.5, "final_image_loss": 4.5}
    (root / "pirl" / "results.json").write_text(json.dumps(results))
    return root


def verdicts(report: Path) -> dict[str, str]:
    rows = [line.split(" | ") for line in report.read_text().splitlines() if " hold" in line]
    return {r[0].strip("| "): r[-1].strip("| ") for r in rows}


def test_each_claim_is_judged_from_the_numbers(tmp_path: Path) -> None:
    v = verdicts(write_report(outputs(tmp_path / "a", jigsaw_res5=28.0, pirl_ratio=0.5)))
    assert v["pirl learned its task: loss below chance"] == "holds"
    assert v["pirl's res5 beats its untrained trunk on kNN"] == "holds"
    assert v["Table 2: PIRL beats Jigsaw on every benchmark"] == "holds"
    assert v["Table 2: PIRL beats NPID++ on every benchmark"] == "does not hold"  # VOC07 30 < 31
    assert v["Fig. 5: Jigsaw's probe peaks before res5 and falls at res5"] == "holds"
    assert v["Fig. 5: PIRL's probe keeps rising to res5"] == "holds"
    assert v["Fig. 4: PIRL is more invariant to the jigsaw transform than Jigsaw (res5)"] == "holds"
    heads = (
        "Fig. 4: PIRL's heads are invariant: g of the jigsaw view lies nearer f of its own image "
        "than of others"
    )
    assert v[heads] == "holds"  # ratio 0.5, retrieval 20% against chance 1%
    assert v["pirl's patch term learned: at least 1 nat below chance"] == "holds"  # 5.5 vs 6.9
    assert (tmp_path / "a" / "probe_by_layer.png").read_bytes()[:4] == b"\x89PNG"
    # The same files with the orderings reversed.
    v = verdicts(write_report(outputs(tmp_path / "b", jigsaw_res5=40.0, pirl_ratio=0.95)))
    assert v["Fig. 5: Jigsaw's probe peaks before res5 and falls at res5"] == "does not hold"
    assert "did not leave chance" not in (tmp_path / "b" / "report.md").read_text()
    assert v["Fig. 4: PIRL is more invariant to the jigsaw transform than Jigsaw (res5)"] == (
        "does not hold"
    )
    assert v[heads] == "does not hold"  # ratio 0.95


def test_a_missing_output_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"table2\.csv: missing"):
        write_report(tmp_path)


def test_a_pretraining_that_did_not_learn_is_said_first(tmp_path: Path) -> None:
    root = outputs(tmp_path, jigsaw_res5=28.0, pirl_ratio=0.5)
    results = {"final_loss": 6.95, "chance_loss": 6.93, "knn_top1": 9.4, "random_knn_top1": 15.3}
    (root / "pirl" / "results.json").write_text(json.dumps(results))
    text = write_report(root).read_text()
    assert "**1 of 1 losses did not leave chance**" in text
    v = verdicts(root / "report.md")
    assert v["pirl learned its task: loss below chance"] == "does not hold"
    assert v["pirl's res5 beats its untrained trunk on kNN"] == "does not hold"


def test_a_pretext_learned_with_a_worse_res5_is_not_called_unlearned(tmp_path: Path) -> None:
    """Jigsaw in the paper: its pretext solved, its res5 below an untrained trunk's."""
    root = outputs(tmp_path, jigsaw_res5=28.0, pirl_ratio=0.5)
    results = {"final_loss": 0.05, "chance_loss": 4.6, "knn_top1": 40.0, "random_knn_top1": 60.0}
    (root / "pirl" / "results.json").write_text(json.dumps(results))
    text = write_report(root).read_text()
    assert "did not leave chance" not in text
    assert verdicts(root / "report.md")["pirl's res5 beats its untrained trunk on kNN"] == (
        "does not hold"
    )


def test_orderings_that_fail_come_with_what_was_measured(tmp_path: Path) -> None:
    """PIRL's curve peaking early is put beside an untrained trunk's conv1; PIRL below NPID++
    beside the lambda sweep, when one ran next to it."""
    root = outputs(tmp_path / "runs" / "paper-small", jigsaw_res5=28.0, pirl_ratio=0.5)
    for layer in ("res4", "res5"):  # PIRL now falls after res3
        t = pd.read_csv(root / "layers" / layer / "table2.csv")
        t.loc[t["Method"] == "pirl", "ImageNet"] = 10.0
        t.to_csv(root / "layers" / layer / "table2.csv", index=False)
    sweep = tmp_path / "runs" / "lambda"
    sweep.mkdir()
    pd.DataFrame(
        {"lambda": [0.0, 1.0], "kNN top-1": [88.0, 70.0], "res5 linear top-1": [87.0, 60.0]}
    ).to_csv(sweep / "lambda.csv", index=False)
    text = write_report(root).read_text()
    assert "## What was measured where a claim does not hold" in text
    assert "an untrained trunk's conv1 already reaches 10.0 (its res5 10.0)" in text
    assert "pirl peaks at res3 (20.0; res5 10.0)" in text
    assert "lambda 0: kNN 88.0, res5 linear 87.0, 1: kNN 70.0, res5 linear 60.0" in text


def test_the_report_command_writes_it_and_names_a_missing_file_on_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pirl_tools.main import main

    root = outputs(tmp_path / "a", jigsaw_res5=28.0, pirl_ratio=0.5)
    res = CliRunner().invoke(main, ["analyze", "report", str(root)])
    assert res.exit_code == 0 and (root / "report.md").exists(), res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["analyze", "report", str(tmp_path / "empty")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert res.output.startswith(f"error: {tmp_path / 'empty'}")


def test_lambda_sweep_table_orders_runs_by_lambda(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pirl_tools.main import main

    for lam, knn in ((0.5, 70.0), (0.0, 75.0), (1.0, 40.0)):
        run = tmp_path / f"lam{lam:g}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"lam": lam}))
        r = {"knn_top1": knn, "linear_top1": knn + 2, "chance_loss": 6.93, "final_image_loss": 2}
        if lam > 0:
            r |= {"final_patch_loss": 6 - lam, "fg_retrieval": 10 * lam, "fg_ratio": 1 - lam / 4}
        (run / "results.json").write_text(json.dumps(r))
    res = CliRunner().invoke(main, ["analyze", "lambda", str(tmp_path)])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "lambda.csv")
    assert table["lambda"].tolist() == [0.0, 0.5, 1.0]
    assert table["kNN top-1"].tolist() == [75.0, 70.0, 40.0]
    assert table["patch term"].isna().tolist() == [True, False, False]
    assert table["g retrieves own f (%)"].tolist()[1:] == [5.0, 10.0]
    assert (tmp_path / "lambda.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 0.500 |" in (tmp_path / "lambda.md").read_text()
    (tmp_path / "lam1" / "results.json").unlink()
    res = CliRunner().invoke(main, ["analyze", "lambda", str(tmp_path)])
    assert res.exit_code == 2 and "lam1/results.json: missing" in res.output
