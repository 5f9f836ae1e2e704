"""End-to-end command line: a user mistake is one `error:` line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pirl_tools.main import main


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

    from pirl.tables import comparison
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
    assert table[4].split()[-2:] == [
        f"{results['fg_retrieval']:.1f}",
        f"{results['random_fg_retrieval']:.1f}",
    ]
    assert table[5].split()[-2:] == [
        f"{results['fg_ratio']:.3f}",
        f"{results['random_fg_ratio']:.3f}",
    ]
    assert table[6].startswith("final training loss") and "patch term" in table[6]


def test_help_imports_nothing_heavy() -> None:
    """`pirl-tools --help` and `pirl-tools transfer --help` answer without torch & co."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pirl_tools.main import main\n"
        "for args in (['--help'], ['transfer', '--help']):\n"
        "    try:\n"
        "        main(args)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = ('torch', 'torchvision', 'numpy', 'pandas', 'sklearn', 'faiss', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "table2" in out.stdout and "table3" in out.stdout
    assert out.stdout.strip().endswith("[]")


def test_version_names_torch() -> None:
    import torch

    from pirl_tools import __version__

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith(f"pirl-tools {__version__} (torch {torch.__version__}")


def test_weights_name_keeps_a_random_spec_whole(tmp_path: Path) -> None:
    from pirl.spec import parse_weights

    ckpt = tmp_path / "mine.pth"
    ckpt.write_bytes(b"")
    assert parse_weights("random:resnet18@0.25") == ("random:resnet18@0.25", "random:resnet18@0.25")
    assert parse_weights(str(ckpt)) == ("mine", str(ckpt))
    assert parse_weights("a=random:resnet18@0.25") == ("a", "random:resnet18@0.25")


def test_table3_user_error_exits_2_with_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["transfer", "table3", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'nope'}: run folder does not exist\n"


def test_config_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\nepoch: 2\n")
    result = CliRunner().invoke(main, ["pretrain", "--config", str(cfg)])
    assert result.exit_code == 2
    assert result.output == f"error: --config {cfg}: unknown key 'epoch' for `pretrain`\n"


def test_pretrain_config_json_reads_back_as_config(tiny_folder: Path, tmp_path: Path) -> None:
    """A run folder's config.json repeats the run: the same loss, flags still override."""
    import csv
    import json

    first, second = tmp_path / "first", tmp_path / "second"
    args = ["pretrain", "--data", str(tiny_folder), "--arch", "resnet18", "--width", "0.125"]
    args += ["--image-size", "32", "--epochs", "1", "--batch-size", "8", "--num-negatives", "16"]
    args += ["--num-workers", "0", "--device", "cpu", "--momentum", "0.8", "--embed-dim", "32"]
    result = CliRunner().invoke(main, [*args, "--out", str(first)])
    assert result.exit_code == 0, result.output
    again = ["pretrain", "--config", str(first / "config.json"), "--out", str(second)]
    result = CliRunner().invoke(main, again)
    assert result.exit_code == 0, result.output
    configs = [json.loads((run / "config.json").read_text()) for run in (first, second)]
    assert {**configs[0], "out": ""} == {**configs[1], "out": ""}
    assert configs[1]["momentum"] == 0.8 and configs[1]["embed_dim"] == 32
    losses = [
        [row["loss"] for row in csv.DictReader((run / "metrics.csv").open())]
        for run in (first, second)
    ]
    assert losses[0] == losses[1]
    assert json.loads((first / "results.json").read_text()) == json.loads(
        (second / "results.json").read_text()
    )
    # A config recorded by a resumed, overwriting run: read back, it neither resumes nor
    # overwrites, nor writes into the recorded folder.
    resumed = [*args, "--out", str(first), "--resume", "--allow-change", "epochs", "--epochs", "2"]
    assert CliRunner().invoke(main, resumed).exit_code == 0
    recorded = json.loads((first / "config.json").read_text())
    assert recorded["resume"] and recorded["allow_change"] == ["epochs"]
    third = tmp_path / "third"
    result = CliRunner().invoke(
        main, ["pretrain", "--config", str(first / "config.json"), "--out", str(third)]
    )
    assert result.exit_code == 0, result.output
    third_config = json.loads((third / "config.json").read_text())
    assert not third_config["resume"] and third_config["allow_change"] == []
    assert third_config["epochs"] == 2


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        (["pretrain"], "--epochs", "0"),
        (["pretrain"], "--batch-size", "0"),
        (["pretrain"], "--num-workers", "-1"),
        (["transfer", "linear", "--weights", "random:resnet18@0.125"], "--batch-size", "0"),
        (["transfer", "linear", "--weights", "random:resnet18@0.125"], "--epochs", "0"),
        (["transfer", "lowshot", "--weights", "random:resnet18@0.125"], "--batch-size", "0"),
        (["transfer", "lowshot", "--weights", "random:resnet18@0.125"], "--epochs", "0"),
        (["transfer", "detection"], "--iters", "0"),
        (["transfer", "detection"], "--batch-size", "0"),
    ],
)
def test_counts_below_their_minimum_are_one_line_before_any_work(
    tmp_path: Path, command: list[str], flag: str, value: str
) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [*command, flag, value, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert (
        res.output.strip() == f"error: {flag} {value}: must be at least {0 if value == '-1' else 1}"
    )
    assert not (out / "config.json").exists()


def test_an_os_error_is_one_line_naming_the_path(tmp_path: Path) -> None:
    """A file where a folder should be (or a full or read-only disk) is the user's to fix."""
    import torch

    from pirl.trunk import build_trunk

    torch.save(build_trunk("resnet18", 0.125).state_dict(), tmp_path / "w.pth")
    (tmp_path / "file").write_text("not a folder")
    target = tmp_path / "file" / "out.pth"
    res = CliRunner().invoke(
        main,
        ["weights", "convert", str(tmp_path / "w.pth"), "--to", "torchvision", "-o", str(target)],
    )
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert res.output.startswith(f"error: {tmp_path / 'file'}: File exists")
