"""End-to-end command line: a user mistake is one `error:` line and exit code 2."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from pirl.cli import main


def test_pretrain_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'nope'}: data folder does not exist"


def test_pretrain_resume_without_checkpoint(tiny_folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "pretrain",
            "--data",
            str(tiny_folder),
            "--resume",
            "--out",
            str(tmp_path / "run"),
            "--nproc",
            "2",
        ],
    )
    assert result.exit_code == 2
    assert "nothing to resume" in result.output and "Traceback" not in result.output


def test_pretrain_end_to_end_prints_checkpoint(tiny_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "pretrain",
        "--data",
        str(tiny_folder),
        "--out",
        str(out),
        "--arch",
        "resnet18",
        "--width",
        "0.125",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--num-negatives",
        "32",
        "--num-workers",
        "0",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"checkpoint: {out / 'checkpoint.pth'}" in result.output
    assert (out / "config.json").exists() and (out / "metrics.csv").exists()


def test_embedded_comparison_adds_linear_probes_and_prints_a_table(
    tiny_folder: Path, tmp_path: Path
) -> None:
    """The demo's closing table: kNN and a res5 linear probe against an untrained trunk, the
    probes equal to `transfer linear` on the same split."""
    import json

    from pirl.cli import comparison
    from transfer.linear_probe import probe_against_untrained, run_linear

    split = tmp_path / "split"
    for i, p in enumerate(sorted(tiny_folder.rglob("*.png"))):
        dest = split / ("val" if i % 4 == 0 else "train") / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(tiny_folder), "--out", str(run), "--epochs", "1"]
    args += ["--arch", "resnet18", "--width", "0.125", "--image-size", "32", "--batch-size", "16"]
    args += ["--num-negatives", "64", "--num-workers", "0", "--device", "cpu"]
    args += ["--eval-every", "1", "--val-data", str(split)]
    assert CliRunner().invoke(main, args).exit_code == 0
    results = probe_against_untrained(run, "cpu", 0)
    again = run_linear(
        f"pirl={run / 'checkpoint.pth'}",
        "imagenet",
        split,
        "res5",
        device="cpu",
        num_workers=0,
        image_size=32,
        augment=False,
    )
    assert results["linear_top1"] == again["top1"]
    assert json.loads((run / "results.json").read_text()) == results
    table = comparison("pirl", results).splitlines()
    assert table[1].split() == ["PIRL", "untrained"]
    assert table[2].split()[-2:] == [
        f"{results['knn_top1']:.1f}",
        f"{results['random_knn_top1']:.1f}",
    ]
    assert table[3].split()[-1] == f"{results['random_linear_top1']:.1f}"
    assert table[4].startswith("final training loss")
