"""Run folders (config, metrics, results every command writes) and device/seed set-up."""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pirl.errors import UserError


def resolve_device(device: str = "auto") -> torch.device:
    """Pick cuda when present for 'auto', so the same command runs on a laptop and a GPU node."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group torchrun (or our spawner) describes in the environment, if any,
    and return (rank, world size, this process's device: cuda:LOCAL_RANK under DDP on GPU)."""
    dev = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank, size = world()
    if dev.type == "cuda" and size > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    return rank, size, dev


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch so a run repeats exactly on the CPU."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a sibling temp file then rename, so a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save through a temp file and rename: the previous checkpoint survives any crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunDir:
    """A run folder with config.json, metrics.csv, results.json, so any result can be repeated."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Record the fully resolved config (every default made explicit)."""
        data = json.dumps(dict(config), indent=2, sort_keys=True, default=str).encode()
        atomic_write_bytes(self.path("config.json"), data)
        return self.path("config.json")

    def append_metrics(self, row: Mapping[str, Any], name: str = "metrics.csv") -> None:
        """Append one row; the header is written with the first row, and a row whose columns
        differ from the file's (a run folder from an older version) is refused, not misfiled."""
        path = self.path(name)
        new = not path.exists()
        if not new:
            with open(path, newline="") as fh:
                header = next(csv.reader(fh), [])
            if header != list(row):
                raise UserError(
                    f"{path}: columns {header} differ from this version's {list(row)}; "
                    "start a new run folder"
                )
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(dict(row))

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """Write results.json atomically."""
        data = json.dumps(dict(results), indent=2, sort_keys=True, default=str).encode()
        atomic_write_bytes(self.path("results.json"), data)
        return self.path("results.json")
