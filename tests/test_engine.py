"""Run folders: metrics rows keep one set of columns."""

from __future__ import annotations

from pathlib import Path

import pytest

from pirl.engine import RunDir
from pirl.errors import UserError


def test_metrics_rows_with_other_columns_are_refused_not_misfiled(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.append_metrics({"epoch": 1, "loss": 2.5})
    run.append_metrics({"epoch": 2, "loss": 2.0})
    with pytest.raises(UserError, match=r"metrics\.csv: columns \['epoch', 'loss'\] differ"):
        run.append_metrics({"epoch": 3, "loss": 1.5, "knn_top1": 40.0})
    assert run.path("metrics.csv").read_text().splitlines() == ["epoch,loss", "1,2.5", "2,2.0"]
