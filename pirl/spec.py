"""The one reading of `--weights [NAME=]PATH`, shared by the command line and the recipes (kept
free of heavy imports, so `pirl-tools --help` stays instant)."""

from __future__ import annotations

from pathlib import Path


def parse_weights(spec: str) -> tuple[str, str]:
    """`[NAME=]PATH` -> (name, path): NAME, else an existing file's stem, else the spec itself
    (so `random:resnet18@0.25` keeps its whole name)."""
    name, sep, path = spec.partition("=")
    if sep:
        return name, path
    return (Path(spec).stem if Path(spec).is_file() else spec), spec
