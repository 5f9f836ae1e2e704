"""The flags every sub-command shares, so the same thing has the same name everywhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

F = Callable[..., Any]


def parse_weights(spec: str) -> tuple[str, str]:
    """Split `--weights [NAME=]PATH` into (name, path); the name defaults to the file's stem."""
    name, sep, path = spec.partition("=")
    if not sep:
        from pathlib import Path

        return Path(spec).stem, spec
    return name, path


def data_option(f: F) -> F:
    return click.option(
        "--data",
        type=click.Path(file_okay=False, path_type=str),
        default=None,
        help="Data set folder; omitted: the small embedded data set.",
    )(f)


def out_option(default: str) -> Callable[[F], F]:
    def deco(f: F) -> F:
        return click.option(
            "--out",
            type=click.Path(file_okay=False, path_type=str),
            default=default,
            show_default=True,
            help="Run folder: config.json, metrics.csv, results.json, plots.",
        )(f)

    return deco


def weights_option(multiple: bool = False, required: bool = False) -> Callable[[F], F]:
    def deco(f: F) -> F:
        return click.option(
            "--weights",
            "weights",
            multiple=multiple,
            required=required,
            help="Encoder checkpoint as [NAME=]PATH" + (" (repeatable)." if multiple else "."),
        )(f)

    return deco


def runtime_options(batch_size: int, num_workers: int = 2) -> Callable[[F], F]:
    """--device, --seed, --batch-size, --num-workers with the given paper defaults."""

    def deco(f: F) -> F:
        for opt in reversed(
            [
                click.option(
                    "--device",
                    default="auto",
                    show_default=True,
                    help="cpu, cuda, cuda:N or auto (cuda when present).",
                ),
                click.option("--seed", type=int, default=0, show_default=True),
                click.option("--batch-size", type=int, default=batch_size, show_default=True),
                click.option("--num-workers", type=int, default=num_workers, show_default=True),
            ]
        ):
            f = opt(f)
        return f

    return deco
