"""Run folders: each run-level mistake is one line naming what to do; metrics keep their columns."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from pirl.engine import RunDir, resolve_device
from pirl.errors import UserError

CPU = torch.device("cpu")
CONFIG = {"lr": 0.1, "epochs": 2, "seed": 0, "device": "cpu", "out": "x"}


def _one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_metrics_rows_with_other_columns_are_refused_not_misfiled(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.start("transfer lowshot", CONFIG, CPU)
    run.append_metrics({"epoch": 1, "loss": 2.5})
    run.append_metrics({"epoch": 2, "loss": 2.0})
    with pytest.raises(UserError, match=r"metrics\.csv: columns \['epoch', 'loss'\] differ"):
        run.append_metrics({"epoch": 3, "loss": 1.5, "knn_top1": 40.0})
    assert run.path("metrics.csv").read_text().splitlines() == ["epoch,loss", "1,2.5", "2,2.0"]


def test_existing_run_needs_resume_or_overwrite(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.start("transfer lowshot", CONFIG, CPU)
    run.append_metrics({"epoch": 1})
    with pytest.raises(UserError) as err:
        run.start("transfer lowshot", CONFIG, CPU)
    assert "a transfer lowshot run exists here; pass --overwrite" in _one_line(err)
    with pytest.raises(UserError) as err:
        run.start("transfer lowshot", CONFIG, CPU, resume=True)
    assert "checkpoint.pth: nothing to resume" in _one_line(err)
    run.save_checkpoint({"epoch": 1})  # a run with a checkpoint can also be continued
    with pytest.raises(UserError) as err:
        run.start("transfer lowshot", CONFIG, CPU)
    assert "exists here; pass --resume to continue it, --overwrite to replace" in _one_line(err)
    run.start("transfer lowshot", {**CONFIG, "lr": 0.2}, CPU, overwrite=True)
    assert not run.path("metrics.csv").exists()
    assert json.loads(run.path("config.json").read_text())["lr"] == 0.2


def test_resume_names_each_changed_setting_unless_allowed(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.start("transfer lowshot", CONFIG, CPU)
    run.save_checkpoint({"epoch": 1})
    changed = {**CONFIG, "lr": 0.2, "epochs": 3, "device": "cuda", "out": "y"}  # runtime: ok
    with pytest.raises(UserError) as err:
        run.start("transfer lowshot", changed, CPU, resume=True)
    assert "changed settings (epochs 2 -> 3, lr 0.1 -> 0.2); pass --allow-change" in _one_line(err)
    with pytest.raises(UserError, match="--allow-change lrr: not a setting"):
        run.start("transfer lowshot", changed, CPU, resume=True, allow_change=("lrr",))
    run.start("transfer lowshot", changed, CPU, resume=True, allow_change=("epochs", "lr"))
    assert len(json.loads(run.path("run.json").read_text())["invocations"]) == 2
    assert run.load_checkpoint() == {"epoch": 1}


def test_out_holding_another_commands_run_is_refused(tmp_path: Path) -> None:
    RunDir(tmp_path / "run").start("transfer linear", {"seed": 0}, CPU)
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(UserError) as err:
            RunDir(tmp_path / "run").start("transfer lowshot", CONFIG, CPU, **kw)
        assert "holds a `transfer linear` run, not `transfer lowshot`" in _one_line(err)


def test_out_that_cannot_be_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "run"
    with pytest.raises(UserError) as err:
        RunDir(out).start("transfer lowshot", CONFIG, CPU)
    assert f"{out}: cannot write the run folder" in _one_line(err)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for out in (locked, locked / "run"):
            with pytest.raises(UserError) as err:
                RunDir(out).start("transfer lowshot", CONFIG, CPU)
            assert f"{out}: cannot write the run folder" in _one_line(err)
    finally:
        locked.chmod(0o700)


def test_stale_temp_files_are_removed_on_start(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.start("transfer lowshot", CONFIG, CPU)
    run.save_checkpoint({"epoch": 1})
    stale = run.path(".checkpoint.pth.tmp12345")
    stale.write_bytes(b"half a checkpoint")
    run.start("transfer lowshot", CONFIG, CPU, resume=True)
    assert not stale.exists() and run.path("checkpoint.pth").exists()


def test_device_this_machine_lacks_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError) as err:
        resolve_device("cuda")
    assert _one_line(err) == "--device cuda: this machine has no CUDA device"
    assert resolve_device("auto") == CPU
    for bad in ("gpu", "tpu"):
        with pytest.raises(UserError) as err:
            resolve_device(bad)
        assert _one_line(err).startswith(f"--device {bad}: ")


def test_run_json_records_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    from pirl import __version__

    argv = ["pirl-tools", "transfer", "lowshot", "--lr", "0.1"]
    monkeypatch.setattr(sys, "argv", argv)
    run = RunDir(tmp_path / "run")
    run.start("transfer lowshot", CONFIG, CPU, record={"encoder": "random"})
    body = json.loads(run.path("run.json").read_text())
    assert body["command"] == "transfer lowshot"
    (inv,) = body["invocations"]
    assert inv["command_line"] == argv and inv["device"] == "cpu" and inv["encoder"] == "random"
    assert inv["versions"]["pirl-tools"] == __version__
    assert inv["versions"]["torch"] == torch.__version__
    assert inv["versions"]["torchvision"] == torchvision.__version__
    assert json.loads(run.path("config.json").read_text()) == CONFIG


def _claiming_rank(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        RunDir(root).start("transfer lowshot", CONFIG, CPU)
        outcome = "started"
    except UserError as exc:
        outcome = f"refused: {exc}"
    Path(root, f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


def test_under_ddp_every_rank_stops_on_rank_0s_refusal(tmp_path: Path) -> None:
    """Else the other ranks go on into the first collective and wait there for ever."""
    from pirl.pretrain import free_port

    run = tmp_path / "run"
    RunDir(run).start("transfer lowshot", CONFIG, CPU)
    torch.multiprocessing.spawn(_claiming_rank, args=(free_port(), str(run)), nprocs=2)
    outcomes = [(run / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith("refused: ")
    assert "a transfer lowshot run exists here" in outcomes[0]


def test_overwrite_removes_the_replaced_runs_outputs_and_nothing_else(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.start("pretrain", CONFIG, CPU)
    for name in ("learning_curve.png", "checkpoint_epoch2.pth", "trunk.pth", "notes.txt"):
        run.path(name).write_text("old")
    (run.path("tensorboard") / "events").mkdir(parents=True)
    run.start("pretrain", CONFIG, CPU, overwrite=True)
    left = sorted(p.name for p in run.root.iterdir())
    assert left == ["config.json", "notes.txt", "run.json"]
