"""Run every benchmark module and write their sections, with the machine they ran on, to a file."""

from __future__ import annotations

import argparse
import importlib
import platform
import time
import traceback
from pathlib import Path

import torch

# Each entry is a module whose run() -> str gives a Markdown section (with the command that
# reproduces it), or module:function for a module with several sections; --only takes the
# module's or the function's name.
MODULES = (
    "bench.demo",
    "bench.embedded_studies:paper_small",
    "bench.embedded_studies:lambda_sweep",
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


def write(out: Path, fresh: dict[str, str], kept: dict[str, str]) -> None:
    """The file: this run's sections first, then the earlier ones it did not replace."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--only", nargs="*", default=None, help="module names, run in this order")
    args = parser.parse_args()
    out = Path(args.out)
    kept = sections_of(out.read_text()) if out.exists() else {}
    fresh: dict[str, str] = {}
    failed = []
    known = {m.split(":")[-1].split(".")[-1]: m for m in MODULES}
    unknown = [n for n in args.only or () if n not in known]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}: choose from {', '.join(known)}")
    # in the order asked for: the figure that matters most first
    chosen = [known[n] for n in args.only] if args.only else list(MODULES)
    for name in chosen:
        print(f"running {name} ...", flush=True)
        try:
            module, _, function = name.partition(":")
            section = getattr(importlib.import_module(module), function or "run")()
        except Exception:  # one broken benchmark must not lose the others' figures
            traceback.print_exc()
            failed.append(name)
            continue
        print(section, flush=True)
        fresh.update(sections_of(section))
        write(out, fresh, kept)  # after each module: a later crash or time-out keeps these
    if fresh:
        print(f"wrote {out}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
