"""Shared fixtures: keep every generated file under the test's tmp dir."""

import pytest


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    """Point $PIRL_TOOLS_CACHE at a tmp dir so tests never write to ~/.cache."""
    monkeypatch.setenv("PIRL_TOOLS_CACHE", str(tmp_path / "cache"))
