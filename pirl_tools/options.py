"""The flags every command shares, the one `[NAME=]PATH` parser and the `--config` loader."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from pirl.errors import UserError
from pirl.spec import parse_weights

F = Callable[..., Any]


def encoder_specs(weights: Iterable[str]) -> list[tuple[str, str]]:
    """(name, path) per --weights, refusing repeated names: they would share a run folder."""
    pairs = [parse_weights(w) for w in weights]
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise UserError(f"--weights: names repeat ({', '.join(names)}); use NAME=PATH")
    return pairs


def embedded_default(paper: object, embedded: object) -> str:
    """The help suffix of a default that depends on --data, written the same way everywhere."""
    return f"[paper: {paper}; embedded: {embedded}]"


class LazyChoice(click.Choice):
    """A Choice whose values live in a library module, imported only when they are needed, so
    that listing the commands imports nothing heavy."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.case_sensitive = True

    @property
    def choices(self) -> Sequence[str]:  # type: ignore[override]
        module, attr = self.source.split(":")
        return tuple(getattr(importlib.import_module(module), attr))


def weights_option(required: bool = False, help: str = "") -> Callable[[F], F]:
    return click.option(
        "--weights",
        multiple=True,
        required=required,
        help="Encoder as [NAME=]PATH, repeatable: any checkpoint format or random[:ARCH[@W]]; "
        "NAME defaults to the file's stem. " + help,
    )


def data_option(help: str) -> Callable[[F], F]:
    return click.option(
        "--data", type=click.Path(file_okay=False, path_type=str), default=None, help=help
    )


def out_option(default: str | None, help: str = "Run folder.") -> Callable[[F], F]:
    return click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=str),
        default=default,
        show_default=default is not None,
        help=help,
    )


def device_option(f: F) -> F:
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="cpu, cuda, cuda:N or auto (cuda when present).",
    )(f)


def seed_option(f: F) -> F:
    return click.option(
        "--seed", type=int, default=0, show_default=True, help="Seed of every random draw."
    )(f)


def runtime_options(
    batch_size: int | None, num_workers: int | None = 2, batch_help: str = "Batch size."
) -> Callable[[F], F]:
    """--device, --seed, --batch-size, --num-workers; a None default comes with its help."""

    def deco(f: F) -> F:
        f = click.option(
            "--num-workers",
            type=int,
            default=num_workers,
            show_default=num_workers is not None,
            help="Data-loading processes.",
        )(f)
        f = click.option(
            "--batch-size",
            type=int,
            default=batch_size,
            show_default=batch_size is not None,
            help=batch_help,
        )(f)
        return device_option(seed_option(f))

    return deco


def run_folder_options(resume: bool = True) -> Callable[[F], F]:
    """--overwrite (and for training commands --resume, --allow-change, --logger) for commands
    that write a run folder."""

    def deco(f: F) -> F:
        f = click.option(
            "--overwrite", is_flag=True, help="Replace the run already in the run folder."
        )(f)
        if not resume:
            return f
        f = click.option(
            "--logger",
            type=LazyChoice("pirl.loggers:LOGGERS"),
            default="none",
            show_default=True,
            help="Also send the metrics to TensorBoard (event files in OUT/tensorboard) or "
            "Weights & Biases (OUT/wandb; offline unless $WANDB_MODE is set).",
        )(f)
        f = click.option(
            "--allow-change",
            multiple=True,
            metavar="KEY",
            help="A setting that may differ from the run's config.json on --resume (repeatable).",
        )(f)
        return click.option(
            "--resume", is_flag=True, help="Continue the run in the run folder from its checkpoint."
        )(f)

    return deco


def metric_option(f: F) -> F:
    return click.option(
        "--metric",
        type=click.Choice(["auto", "11point", "area"]),
        default="auto",
        show_default=True,
        help="VOC07 11-point AP (detectron2 for 2007) or the VOC2010+ area; auto picks by year.",
    )(f)


def read_config(path: str) -> dict[str, Any]:
    """A --config file, YAML or JSON, as a mapping."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UserError(f"--config {path}: not readable ({exc.strerror})") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserError(f"--config {path}: not valid JSON ({exc})") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            why = " ".join(str(exc).split())
            raise UserError(f"--config {path}: not valid YAML ({why})") from None
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values")
    return data


# How the recorded run was invoked, not what it computes: a run folder's config.json read back
# with --config must not resume, overwrite or write into that folder unless the flags say so.
INVOCATION_KEYS = ("out", "resume", "overwrite", "allow_change")


def config_defaults(
    command: click.Command,
    path: str,
    data: Mapping[str, Any],
    recorded: Iterable[str] = (),
) -> dict[str, Any]:
    """The file's values as the command's defaults: keys are option names (underscored); keys
    in `recorded` (what the recipe writes to config.json beyond its options) are skipped."""
    params = {p.name: p for p in command.params if isinstance(p, click.Option)}
    defaults = {}
    for key, value in data.items():
        if key in recorded or key in INVOCATION_KEYS:
            continue
        param = params.get(key)
        if param is None or key == "config":
            raise UserError(f"--config {path}: unknown key {key!r} for `{command.name}`")
        if param.multiple and not isinstance(value, list | tuple):
            value = [] if value is None else [value]
        elif not param.multiple and isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        defaults[key] = value
    return defaults


def config_option(
    recorded: Iterable[str] = (),
    translate: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Callable[[F], F]:
    """--config FILE: its values become the command's defaults; flags given override them.

    `translate` maps what the recipe writes into config.json onto the option names, so a run
    folder's config.json reads back as a --config file."""

    def load(ctx: click.Context, _: click.Parameter, path: str | None) -> None:
        if path is None:
            return
        data = read_config(path)
        if translate is not None:
            data = translate(data)
        ctx.default_map = {
            **(ctx.default_map or {}),
            **config_defaults(ctx.command, path, data, recorded),
        }

    return click.option(
        "--config",
        type=click.Path(dir_okay=False, path_type=str),
        is_eager=True,
        expose_value=False,
        callback=load,
        help="YAML or JSON file of option values (underscored names) used as defaults; a run "
        "folder's config.json works. Flags given here override it.",
    )
