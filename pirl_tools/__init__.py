"""The `pirl-tools` command line: one package, so every flag is defined once."""

from pirl import __version__

__all__ = ["__version__"]
