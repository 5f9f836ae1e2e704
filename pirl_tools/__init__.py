"""The `pirl-tools` command line: one package, so every flag is defined once."""

__version__ = "0.1.0"
