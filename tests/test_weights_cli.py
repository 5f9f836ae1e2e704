"""`pirl-tools weights inspect|convert` through click, including the error exit code."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

from pirl.heads import PirlHeads
from pirl_tools.main import main

# torchvision's ResNet-18 has 11,689,512 parameters; its fc is 512 * 1000 + 1000 = 513,000.
RESNET18_TRUNK_PARAMS = 11_689_512 - 513_000


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


@pytest.fixture
def native_ckpt(r18: dict, tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint.pth"
    trunk = {k: v for k, v in r18.items() if not k.startswith("fc.")}
    torch.save(
        {
            "trunk": trunk,
            "heads": PirlHeads(512, 128, 9).state_dict(),
            "memory": {"bank": torch.randn(29, 128)},
            "epoch": 1,
            "version": 1,
            "config": {"arch": "resnet18", "width": 1.0, "method": "pirl"},
        },
        path,
    )
    return path


def test_inspect_reports_format_arch_params_heads_memory(native_ckpt: Path) -> None:
    result = CliRunner().invoke(main, ["weights", "inspect", str(native_ckpt)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"file: {native_ckpt}",
        "format: native",
        "architecture: resnet18 (width 1)",
        f"parameters: {RESNET18_TRUNK_PARAMS}",
        "heads: f, g (PIRL projection heads)",
        "memory bank: 29 entries",
    ]


def test_inspect_reports_unmapped_heads(r18: dict, tmp_path: Path) -> None:
    trunk = {f"_feature_blocks.{k}": v for k, v in r18.items() if not k.startswith("fc.")}
    heads = {"0.clf.0.weight": torch.randn(10, 512, 3), "0.clf.0.bias": torch.randn(10)}
    obj = {"classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}}}
    torch.save(obj, tmp_path / "model_final_checkpoint_phase99.torch")
    result = CliRunner().invoke(
        main, ["weights", "inspect", str(tmp_path / "model_final_checkpoint_phase99.torch")]
    )
    assert result.exit_code == 0, result.output
    assert "format: vissl" in result.output
    assert "heads: present but not PIRL's f and g (2 tensors: 0.clf.0.bias" in result.output


def test_convert_to_detectron2_and_torchvision(
    r18: dict, native_ckpt: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    out = tmp_path / "r18.pkl"
    result = runner.invoke(
        main, ["weights", "convert", str(native_ckpt), "--to", "detectron2", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "MODEL.RESNETS.DEPTH 18" in result.output
    with open(out, "rb") as fh:  # our own file: a plain pickle.load is fine here
        d2 = pickle.load(fh)
    assert d2["__author__"] == "pirl-tools" and d2["matching_heuristics"] is True
    assert (
        d2["model"]["res3.0.shortcut.norm.running_mean"]
        == r18["layer2.0.downsample.1.running_mean"].numpy()
    ).all()
    assert (d2["model"]["stem.conv1.norm.weight"] == r18["bn1.weight"].numpy()).all()
    assert (d2["model"]["res5.1.conv2.weight"] == r18["layer4.1.conv2.weight"].numpy()).all()

    back = tmp_path / "r18.pth"
    result = runner.invoke(
        main, ["weights", "convert", str(out), "--to", "torchvision", "-o", str(back)]
    )
    assert result.exit_code == 0, result.output
    model = torchvision.models.resnet18()
    keys = model.load_state_dict(torch.load(back, weights_only=True), strict=False)
    assert sorted(keys.missing_keys) == ["fc.bias", "fc.weight"] and keys.unexpected_keys == []
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, r18[k]), k


def test_errors_exit_nonzero_with_one_line(native_ckpt: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = tmp_path / "absent.pth"
    result = runner.invoke(main, ["weights", "inspect", str(missing)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {missing}: no such file"
    result = runner.invoke(
        main,
        [
            "weights",
            "convert",
            str(native_ckpt),
            "--arch",
            "resnet50",
            "--to",
            "torchvision",
            "-o",
            str(tmp_path / "x.pth"),
        ],
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "weights do not fit resnet50" in lines[0]
    assert not (tmp_path / "x.pth").exists()
