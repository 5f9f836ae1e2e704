"""Watching runs: metrics to TensorBoard and Weights & Biases, progress as plain log lines off a
terminal, and DDP under srun from SLURM's variables alone."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from pirl.engine import first_slurm_host, progress, setup_distributed
from pirl.pretrain import PretrainConfig, free_port, pretrain

TINY = dict(arch="resnet18", width=0.125, image_size=32, batch_size=16, num_negatives=32)


def tiny_run(data: Path, out: Path, **kw: object) -> PretrainConfig:
    return PretrainConfig(
        data=str(data), out=str(out), epochs=2, num_workers=0, device="cpu", **TINY, **kw
    )


def metrics(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_tensorboard_events_hold_every_metrics_row(tiny_folder: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    pretrain(tiny_run(tiny_folder, out, logger="tensorboard"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = metrics(out)
    for key in ("loss", "lr", "images_per_s"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        expected = [(int(r["step"]), float(r[key])) for r in rows]
        assert [s for s, _ in got] == [s for s, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert "epoch" not in events.Tags()["scalars"] and "knn_top1" not in events.Tags()["scalars"]


def test_wandb_offline_run_needs_no_network(tiny_folder: Path, tmp_path: Path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, step=None, **kw):
        logged.append((step, dict(data)))
        return real_log(self, data, step=step, **kw)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    out = tmp_path / "run"
    pretrain(tiny_run(tiny_folder, out, logger="wandb"))
    (offline,) = (out / "wandb").glob("offline-run-*")  # offline: nothing was sent
    assert next(offline.glob("run-*.wandb")).stat().st_size > 0
    rows = metrics(out)
    assert [step for step, _ in logged] == [int(r["step"]) for r in rows]
    assert [d["loss"] for _, d in logged] == pytest.approx([float(r["loss"]) for r in rows])


def test_off_a_terminal_progress_is_plain_lines(capsys, monkeypatch) -> None:
    monkeypatch.setenv("PIRL_TOOLS_PROGRESS_SECONDS", "0")
    for _ in progress(range(5), desc="epoch 1/1"):
        pass
    lines = capsys.readouterr().err.splitlines()
    assert lines and all("\r" not in line for line in lines)
    assert lines[0].startswith("epoch 1/1:") and "5/5" in lines[-1]
    monkeypatch.setenv("PIRL_TOOLS_PROGRESS_SECONDS", "3600")
    bar = progress(total=25_000, desc="detection")
    for i in range(25_000):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")  # as the loops do at every step
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) <= 3 and "25000/25000" in lines[-1]  # the start, the end: no flood


def test_first_host_of_a_slurm_node_list() -> None:
    assert first_slurm_host("node[01-04,09],login1") == "node01"
    assert first_slurm_host("gpu7") == "gpu7"
    assert first_slurm_host("rack1-node[003-005,010]") == "rack1-node003"
    assert first_slurm_host("a,b") == "a"


def _srun_task(rank: int, port: int, out: str) -> None:
    """One of two tasks as srun starts them: SLURM's variables only, no torchrun's."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(
        SLURM_PROCID=str(rank),
        SLURM_NTASKS="2",
        SLURM_LOCALID=str(rank),
        SLURM_NODELIST="localhost",
        MASTER_PORT=str(port),
    )
    got_rank, size, device = setup_distributed("cpu")
    total = torch.tensor([float(got_rank)])
    torch.distributed.all_reduce(total)
    Path(out, f"task{rank}.json").write_text(
        json.dumps({"rank": got_rank, "world": size, "sum": total.item(), "device": str(device)})
    )
    torch.distributed.destroy_process_group()


def test_srun_tasks_form_one_process_group(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_srun_task, args=(free_port(), str(tmp_path)), nprocs=2)
    tasks = [json.loads((tmp_path / f"task{r}.json").read_text()) for r in (0, 1)]
    assert [t["rank"] for t in tasks] == [0, 1]
    assert all(t["world"] == 2 and t["sum"] == 1.0 and t["device"] == "cpu" for t in tasks)


def test_rows_of_several_probes_keep_their_own_tags(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pirl.engine import RunDir

    run = RunDir(tmp_path / "run")
    run.start("transfer linear", {"layer": "all"}, torch.device("cpu"), logger="tensorboard")
    run.append_metrics({"layer": "res2", "epoch": 1, "loss": 2.0, "val_top1": 30.0})
    run.append_metrics({"layer": "res5", "epoch": 1, "loss": 1.0, "val_top1": 60.0})
    run.write_results({})
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("res2/val_top1")] == [30.0]
    assert [e.value for e in events.Scalars("res5/val_top1")] == [60.0]
