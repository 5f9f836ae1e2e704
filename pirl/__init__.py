"""PIRL core: everything needed to pretrain an encoder and to load one for evaluation."""

__version__ = "0.1.0"
