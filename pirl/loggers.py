"""Where a run's metrics go besides metrics.csv: TensorBoard event files or a Weights & Biases
run, behind one interface that the run folder (pirl/engine.py) calls for every metrics row."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pirl.errors import UserError

LOGGERS = ("none", "tensorboard", "wandb")
# Row keys that say where in the run a row is, rather than measure anything.
STEP_KEYS = ("step", "iteration", "epoch")


def scalars(row: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """The row's numbers (not its position keys, not missing values), each tagged under the
    row's text values (`res3/loss` for a probe's row of layer res3), so rows of several probes
    at one step do not overwrite each other."""
    prefix = "".join(f"{v}/" for v in row.values() if isinstance(v, str))
    for key, value in row.items():
        if key in STEP_KEYS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isnan(value):
            yield prefix + key, float(value)


def step_of(row: Mapping[str, Any]) -> int:
    """The x-axis of a row: optimizer steps where recorded, else iterations, else epochs."""
    for key in STEP_KEYS:
        if isinstance(row.get(key), int):
            return int(row[key])
    return 0


class MetricLogger:
    """No external logger: metrics.csv holds everything."""

    def log(self, row: Mapping[str, Any]) -> None:
        """Record one metrics row."""

    def close(self) -> None:
        """Flush and release what the logger holds open."""


class TensorBoardLogger(MetricLogger):
    """Event files in RUN/tensorboard (`tensorboard --logdir RUN`), flushed at every row so a
    killed run keeps what it logged."""

    def __init__(self, root: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "--logger tensorboard: tensorboard is not installed; "
                "pip install 'pirl-tools[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(root / "tensorboard"))

    def log(self, row: Mapping[str, Any]) -> None:
        step = step_of(row)
        for key, value in scalars(row):
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(MetricLogger):
    """A Weights & Biases run in RUN/wandb, offline unless $WANDB_MODE says otherwise (no
    network needed; `wandb sync` uploads it later); project $WANDB_PROJECT or pirl-tools."""

    def __init__(self, root: Path, config: Mapping[str, Any], name: str) -> None:
        try:
            import wandb
        except ImportError:
            raise UserError(
                "--logger wandb: wandb is not installed; pip install 'pirl-tools[wandb]'"
            ) from None
        self.run = wandb.init(
            dir=str(root),
            config=dict(config),
            name=name,
            project=os.environ.get("WANDB_PROJECT", "pirl-tools"),
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def log(self, row: Mapping[str, Any]) -> None:
        self.run.log(dict(scalars(row)), step=step_of(row))

    def close(self) -> None:
        self.run.finish()


def make_logger(kind: str, root: Path, config: Mapping[str, Any]) -> MetricLogger:
    """The logger `--logger` names, writing under the run folder `root`."""
    if kind == "none":
        return MetricLogger()
    if kind == "tensorboard":
        return TensorBoardLogger(root)
    if kind == "wandb":
        return WandbLogger(root, config, root.name)
    raise UserError(f"--logger {kind}: choose from {', '.join(LOGGERS)}")
