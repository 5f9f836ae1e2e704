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
