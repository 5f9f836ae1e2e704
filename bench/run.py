"""Run every benchmark module and write their sections, with the machine they ran on, to a file."""

from __future__ import annotations

import argparse
import importlib
import platform
import time
from pathlib import Path

import torch

# Each module exposes run() -> str (a Markdown section with the command that reproduces it).
MODULES = (
    "bench.demo",
    "bench.pretrain_step",
    "bench.decode",
    "bench.end_to_end",
    "bench.svm",
    "bench.knn",
    "bench.detection",
)


def machine() -> str:
    """Name the device the figures come from: they mean nothing without it."""
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return f"CPU {cpu}, {threads} torch threads; GPU: {gpu}; torch {torch.__version__}"


def sections_of(text: str) -> dict[str, str]:
    """The '## ' sections of a Markdown file, keyed by their header line."""
    out: dict[str, str] = {}
    for chunk in ("\n" + text).split("\n## ")[1:]:
        header = "## " + chunk.splitlines()[0]
        out[header] = ("## " + chunk).rstrip()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--only", nargs="*", default=None, help="module names to run")
    args = parser.parse_args()
    out = Path(args.out)
    kept = sections_of(out.read_text()) if out.exists() else {}
    fresh: dict[str, str] = {}
    for name in MODULES:
        if args.only and name.split(".")[-1] not in args.only:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        print(f"running {name} ...", flush=True)
        fresh.update(sections_of(module.run()))
    kept = {h: body for h, body in kept.items() if h not in fresh}
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {time.strftime('%Y-%m-%d')}; this run's machine: "
        f"{machine()}. Sections from earlier runs (another machine, a GPU, or modules not "
        "re-run) are kept until re-run; each names its machine.",
        "",
    ]
    for body in [*fresh.values(), *kept.values()]:
        lines += [body, ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
