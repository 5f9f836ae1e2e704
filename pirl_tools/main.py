"""The `pirl-tools` group: sub-commands imported on first use, --version, --debug, and the one
place where a user error becomes `error: ...` and exit code 2."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from pirl.errors import UserError
from pirl_tools import __version__

# Each sub-command's module is imported only when it is listed or invoked; those modules import
# the libraries (torch, ...) inside their command functions, so help answers at once.
LAZY_COMMANDS = {
    "pretrain": "pirl_tools.pretrain:pretrain",
    "transfer": "pirl_tools.transfer:transfer",
    "analyze": "pirl_tools.analyze:analyze",
    "weights": "pirl_tools.weights:weights",
    "eval": "pirl_tools.eval:eval_group",
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
        except (click.exceptions.Exit, click.Abort, click.UsageError):
            raise
        except (UserError, click.ClickException, OSError) as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(exc, click.ClickException):
                message = exc.format_message()
            elif isinstance(exc, OSError):  # the disk, not our code: full, read-only, gone
                message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
            else:
                message = str(exc)
            click.echo(f"error: {message}", err=True)
            sys.exit(2)


def _show_version(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    """pirl-tools's version and the torch/torchvision it runs on (imported only here)."""
    if not value or ctx.resilient_parsing:
        return
    import torch
    import torchvision

    click.echo(
        f"pirl-tools {__version__} (torch {torch.__version__}, "
        f"torchvision {torchvision.__version__})"
    )
    ctx.exit()


def _close_distributed() -> None:
    """Under torchrun, leave the process group cleanly once the command is done."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=_show_version,
    help="Show the version (and torch's, torchvision's) and exit.",
)
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """PIRL pretraining and the paper's evaluations for any ResNet encoder."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.call_on_close(_close_distributed)
