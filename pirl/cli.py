"""The `pirl-tools` command line: one group, sub-commands that call into the packages."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from pirl.errors import UserError

# Sub-command groups living in other packages, imported only when invoked so that
# `pirl` itself never imports `transfer` or `analysis` at start-up.
LAZY_COMMANDS = {
    "pretrain": "pirl.train_cli:pretrain",
    "weights": "pirl.weights_cli:weights",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=LazyGroup)
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """PIRL pretraining and the paper's evaluations for any ResNet encoder."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
