"""The run engine every training and evaluation recipe shares: the run folder (config,
environment record, metrics, results, checkpoints), the guard that never overwrites a run, the
resume check, distributed set-up and DDP wrapping, the epoch's seeded loader and the
finite-loss stop. Recipes (pirl/pretrain.py, pirl/jigsaw_pretext.py, transfer/linear_probe.py,
transfer/lowshot.py, transfer/detection.py) hold only their model, step and evaluation."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pirl.errors import UserError
from pirl.loggers import MetricLogger, make_logger
from pirl.safe_load import read_checkpoint

T = TypeVar("T")
# Settings that say where and how a run executes, not what it computes: a resume may change them.
RUNTIME_KEYS = frozenset(
    {
        "out",
        "device",
        "decode",
        "num_workers",
        "resume",
        "overwrite",
        "allow_change",
        "logger",
        "save_every",
    }
)
PROGRESS_ENV = "PIRL_TOOLS_PROGRESS_SECONDS"
# What the engine writes into a run folder (their presence means a run is there).
RUN_FILES = ("config.json", "run.json", "metrics.csv", "results.json", "checkpoint.pth")
# What the recipes and loggers write beside them: an --overwrite removes these too, so nothing
# of the replaced run is mistaken for the new one's.
RUN_OUTPUTS = (
    "checkpoint_epoch*.pth", "trunk.pth", "trunk.safetensors", "learning_curve.png",
    "classifier.pth", "layers.*", "subset.txt", "table1_row.md", "row.md", "knn.*",
    "detections", "detectron2", "tensorboard", "wandb", "detectron2_config.yaml",
    "detectron2_weights.pkl",
)  # fmt: skip


def resolve_device(device: str = "auto") -> torch.device:
    """Pick cuda when present for 'auto', so the same command runs on a laptop and a GPU node;
    a device this machine lacks is a one-line error, not a traceback at the first tensor."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(
            f"--device {device}: unknown device; use cpu, cuda, cuda:N or auto"
        ) from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device}: unsupported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device}: this machine has no CUDA device")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {device}: this machine has {count} CUDA device(s)")
    return dev


def require_at_least(minimum: int, **values: int | None) -> None:
    """A count below its minimum (--epochs 0, --batch-size 0, --num-workers -1) is a one-line
    error before any work, not a run that trains nothing and still prints a result."""
    for key, value in values.items():
        if value is not None and value < minimum:
            raise UserError(f"--{key.replace('_', '-')} {value}: must be at least {minimum}")


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'node[01-04,09],login1' -> 'node01'."""
    first = re.match(r"[^,\[]*(\[[^\]]*\])?[^,]*", nodelist.strip()).group(0)
    bracket = re.search(r"\[([^\]]*)\]", first)
    if bracket is None:
        return first
    start = re.split(r"[-,]", bracket.group(1))[0]
    return first[: bracket.start()] + start + first[bracket.end() :]


def slurm_environment() -> None:
    """Under `srun` with several tasks and no torchrun, describe the process group as torchrun
    would: RANK, WORLD_SIZE, LOCAL_RANK from SLURM's task variables, MASTER_ADDR the first host
    of the job, MASTER_PORT from the job id (unless set), so `srun pirl-tools ...` runs DDP."""
    env = os.environ
    if "WORLD_SIZE" in env or int(env.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1")))
    env.setdefault("MASTER_PORT", str(20_000 + int(env.get("SLURM_JOB_ID", "0")) % 20_000))


def setup_distributed(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group torchrun, srun (SLURM) or our spawner describes in the
    environment, if any, and return (rank, world size, this process's device:
    cuda:LOCAL_RANK under DDP on GPU)."""
    dev = resolve_device(device)
    slurm_environment()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank, size = world()
    if dev.type == "cuda" and size > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    return rank, size, dev


class _LogLines(io.TextIOBase):
    """A file for tqdm that turns each refresh into one plain line on stderr."""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        return len(text)


class _PeriodicBar(tqdm):
    """tqdm whose postfix waits for the next periodic line instead of forcing one."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    initial: int = 0,
) -> tqdm:
    """A progress bar on a terminal; elsewhere (a cluster job's log file) one plain line every
    $PIRL_TOOLS_PROGRESS_SECONDS (60) and a last one at the end, so a 25,000-iteration run does
    not fill its log. Silent on every rank but 0."""
    quiet = world()[0] != 0
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, initial=initial, leave=False, disable=quiet)
    every = float(os.environ.get(PROGRESS_ENV, "60"))
    return _PeriodicBar(
        iterable,
        total=total,
        desc=desc,
        initial=initial,
        disable=quiet,
        file=_LogLines(),
        mininterval=every,
        maxinterval=max(every, 1e-3),
        miniters=1,
        ascii=True,
        ncols=100,
    )


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """The model DistributedDataParallel-wrapped under torch.distributed, else as it is."""
    if world()[1] == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def rank_batch(batch_size: int) -> int:
    """Each process's share of the global batch; a batch the processes cannot share equally is
    refused (the LR is scaled from the global batch, so a silently smaller one trains another
    recipe)."""
    size = world()[1]
    if batch_size % size:
        raise UserError(f"--batch-size {batch_size} is not divisible by {size} processes")
    return batch_size // size


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one rank: what makes a resumed epoch repeat exactly."""
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**63


def epoch_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    num_workers: int,
    collate_fn: Any = None,
) -> torch.utils.data.DataLoader:
    """One epoch's shuffled loader of a global batch split over the ranks; its order and its
    workers' augmentation seeds depend on (seed, epoch, rank) only, so a resume repeats it."""
    rank, size = world()
    per_rank = rank_batch(batch_size)
    sampler = None
    if size > 1:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        sampler.set_epoch(epoch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=per_rank,
        shuffle=sampler is None,
        sampler=sampler,
        generator=torch.Generator().manual_seed(epoch_seed(seed, epoch, rank)),
        num_workers=num_workers,
        collate_fn=collate_fn,
        drop_last=len(dataset) > per_rank * size,
        pin_memory=torch.cuda.is_available(),
    )


def param_groups(
    model: nn.Module, weight_decay: float, decay_bias: bool = False
) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights, and on linear biases when decay_bias (VISSL's
    regularize_bias: its NPID++ config sets it, its PIRL config does not); never on BN."""
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    bn = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        wanted = p.ndim > 1 or (decay_bias and id(p) not in bn)
        (decay if wanted else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


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


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as config.json holds it (tuples as lists), so saved and new compare equal."""
    return json.loads(json.dumps(dict(config), default=str))


def _git_commit() -> dict[str, Any] | None:
    """The checkout's commit (and whether it had local changes) when run from a git checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "local_changes": bool(status.stdout.strip())}


def environment(device: torch.device) -> dict[str, Any]:
    """What a result depends on besides its config: versions, commit, device, command line."""
    import torchvision

    from pirl import __version__

    name = str(device)
    if device.type == "cuda":
        name += f" ({torch.cuda.get_device_name(device)})"
    return {
        "command_line": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "pirl-tools": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
        "git": _git_commit(),
        "device": name,
        "world_size": world()[1],
        "host": platform.node(),
    }


class RunDir:
    """A run folder with config.json, run.json, metrics.csv, results.json and checkpoints, so
    any result can be repeated and no run is ever overwritten by accident."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.logger = MetricLogger()  # start() sets the one --logger names

    def path(self, name: str) -> Path:
        return self.root / name

    def check(
        self,
        command: str,
        config: Mapping[str, Any],
        *,
        resume: bool = False,
        overwrite: bool = False,
        allow_change: Sequence[str] = (),
        checkpoint: str = "checkpoint.pth",
    ) -> None:
        """Refuse, before any work: an unwritable folder, another command's run, an existing run
        without --resume or --overwrite, and a resume whose settings differ (except runtime keys
        and allow_change), naming each changed key."""
        self._writable()
        saved_cmd = self._saved_command()
        if saved_cmd not in (None, command):
            raise UserError(
                f"{self.root}: holds a `{saved_cmd}` run, not `{command}`; choose another --out"
            )
        ckpt = self.path(checkpoint)
        if resume:
            if not ckpt.exists():
                raise UserError(f"{ckpt}: nothing to resume (no checkpoint)")
            self._check_resume(config, allow_change)
        elif any(self.path(n).exists() for n in RUN_FILES) and not overwrite:
            cont = "--resume to continue it, " if ckpt.exists() else ""
            raise UserError(
                f"{self.root}: a {command} run exists here; pass {cont}--overwrite to replace "
                "it, or choose another --out"
            )

    def start(
        self,
        command: str,
        config: Mapping[str, Any],
        device: torch.device,
        *,
        resume: bool = False,
        overwrite: bool = False,
        allow_change: Sequence[str] = (),
        record: Mapping[str, Any] | None = None,
        checkpoint: str = "checkpoint.pth",
        logger: str = "none",
    ) -> None:
        """Claim the folder for `command` (rank 0 checks and writes; under DDP every rank raises
        rank 0's refusal): check(), remove temp files of a killed write, write config.json
        (what --config reads back) and run.json (environment and command line of every
        invocation), and open the metrics logger (`logger`: none, tensorboard, wandb).
        `checkpoint` is the file a resume continues from (a backend may keep its own)."""
        rank, size = world()
        refusal = None
        if rank == 0:
            try:
                self.check(
                    command,
                    config,
                    resume=resume,
                    overwrite=overwrite,
                    allow_change=allow_change,
                    checkpoint=checkpoint,
                )
            except UserError as exc:
                refusal = str(exc)
        if size > 1:  # every rank stops on rank 0's refusal, none waits in a collective
            shared = [refusal]
            dist.broadcast_object_list(shared, src=0)
            refusal = shared[0]
        if refusal is not None:
            raise UserError(refusal)
        if rank != 0:
            return
        for stale in self.root.glob(".*.tmp*"):  # a write killed before its rename
            stale.unlink(missing_ok=True)
        if overwrite and not resume:
            for pattern in (*RUN_FILES, *RUN_OUTPUTS):
                for old in self.root.glob(pattern):
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        data = json.dumps(_jsonable(config), indent=2, sort_keys=True).encode()
        atomic_write_bytes(self.path("config.json"), data)
        runs = self._runs() if resume else []
        runs.append({**environment(device), **(record or {})})
        body = {"command": command, "invocations": runs}
        atomic_write_bytes(self.path("run.json"), json.dumps(body, indent=2, default=str).encode())
        self.logger = make_logger(logger, self.root, _jsonable(config))

    def _writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.path(f".write-test.tmp{os.getpid()}")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"{self.root}: cannot write the run folder ({exc.strerror})") from None

    def _read_json(self, name: str) -> Any:
        path = self.path(name)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: unreadable ({exc})") from None

    def _saved_command(self) -> str | None:
        if not self.path("run.json").exists():
            return None
        data = self._read_json("run.json")
        return data.get("command") if isinstance(data, dict) else None

    def _runs(self) -> list[Any]:
        if not self.path("run.json").exists():
            return []
        data = self._read_json("run.json")
        return list(data.get("invocations", [])) if isinstance(data, dict) else []

    def _check_resume(self, config: Mapping[str, Any], allow_change: Sequence[str]) -> None:
        new = _jsonable(config)
        unknown = sorted(set(allow_change) - set(new))
        if unknown:
            raise UserError(f"--allow-change {unknown[0]}: not a setting of this run")
        if not self.path("config.json").exists():
            return
        saved = self._read_json("config.json")
        skip = RUNTIME_KEYS | set(allow_change)
        changed = [
            k for k in sorted(set(saved) | set(new)) if k not in skip and saved.get(k) != new.get(k)
        ]
        if changed:
            diffs = ", ".join(f"{k} {saved.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise UserError(
                f"{self.path('config.json')}: --resume with changed settings ({diffs}); pass "
                "--allow-change KEY for each that may change, or choose another --out"
            )

    def save_checkpoint(self, state: Mapping[str, Any], name: str = "checkpoint.pth") -> Path:
        """Write a checkpoint atomically: the previous one survives any crash."""
        atomic_torch_save(dict(state), self.path(name))
        return self.path(name)

    def load_checkpoint(self, name: str = "checkpoint.pth") -> dict[str, Any]:
        """Read a checkpoint back without running code from it (weights_only)."""
        state = read_checkpoint(self.path(name))
        if not isinstance(state, dict):
            raise UserError(f"{self.path(name)}: not a checkpoint of this run")
        return state

    def restore(self, apply: Callable[[dict[str, Any]], T]) -> T:
        """Read the checkpoint and hand it to the recipe's `apply` (model, optimizer, counters);
        one that does not fit this run (other shapes, missing entries) is one line naming it."""
        state = self.load_checkpoint()
        try:
            return apply(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise UserError(
                f"{self.path('checkpoint.pth')}: cannot resume from this checkpoint ({first})"
            ) from None

    def check_finite(
        self, loss: float, where: str, device: torch.device, name: str = "checkpoint.pth"
    ) -> None:
        """Stop on a NaN or infinite loss before the step is applied, naming the last good
        checkpoint (the one on disk is never replaced by a diverged state); under DDP every rank
        stops when any rank's loss is not finite."""
        bad = not math.isfinite(loss)
        if world()[1] > 1:
            flag = torch.tensor(float(bad), device=device)
            dist.all_reduce(flag)
            bad = flag.item() > 0
        if not bad:
            return
        ckpt = self.path(name)
        kept = f"last good checkpoint kept at {ckpt}" if ckpt.exists() else "no checkpoint yet"
        raise UserError(f"{self.root}: loss became {loss} at {where}; stopped, {kept}")

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
        self.logger.log(row)

    def write_results(self, results: Mapping[str, Any]) -> Path:
        """Write results.json atomically; the run is over, so the metrics logger is closed."""
        data = json.dumps(dict(results), indent=2, sort_keys=True, default=str).encode()
        atomic_write_bytes(self.path("results.json"), data)
        self.logger.close()
        self.logger = MetricLogger()
        return self.path("results.json")
