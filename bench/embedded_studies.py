"""`make paper-small` and `make lambda-sweep` as a user runs them, timed whole: the paper's
analyses and its lambda ablation on the embedded set, with what each run learned.

Both run from the repository root into a temporary OUT (the embedded set's cache is shared,
so only the first run ever writes it). Reproduce: `python -m bench.run --only paper_small
lambda_sweep`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd

from pirl.tables import markdown_table

ROOT = Path(__file__).resolve().parent.parent


def timed_make(target: str, out: Path) -> tuple[float, float]:
    """(minutes, peak RSS of the largest finished descendant in GiB) of `make target`."""
    start = time.perf_counter()
    subprocess.run(["make", target, f"OUT={out}"], cwd=ROOT, check=True, capture_output=True)
    minutes = (time.perf_counter() - start) / 60
    return minutes, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def learned(run: Path) -> dict[str, object]:
    """One pretraining's figures from its results.json (absent keys: the method has none)."""
    r = json.loads((run / "results.json").read_text())
    keys = ("final_loss", "final_patch_loss", "final_image_loss", "chance_loss", "knn_top1")
    keys += ("random_knn_top1", "fg_retrieval", "fg_ratio")
    return {"run": run.name, **{k: r.get(k) for k in keys}}


def paper_small() -> str:
    """The section of `make paper-small`."""
    with tempfile.TemporaryDirectory() as tmp:
        minutes, peak = timed_make("paper-small", Path(tmp))
        root = Path(tmp) / "paper-small"
        runs = pd.DataFrame([learned(root / m) for m in ("pirl", "npid", "jigsaw")])
        report = (root / "report.md").read_text().splitlines()
        claims = [line for line in report if line.endswith(("| holds |", "| does not hold |"))]
        causes = [line for line in report if line.startswith("- ")]
    return "\n".join(
        [
            "## make paper-small (bench/embedded_studies.py)",
            "",
            f"`make paper-small` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores: "
            f"{minutes:.1f} min, peak RSS {peak:.2f} GiB (largest process). PIRL, NPID++ and "
            "Jigsaw pretrained on the embedded set, Table 2, the per-layer probes, the "
            "invariance analysis and report.md. Each loss term against chance, kNN against "
            "the untrained trunk, and the heads' invariance on the held-out split:",
            "",
            markdown_table(runs, digits=3),
            "report.md's verdicts:",
            "",
            "| claim | here | verdict |",
            "|---|---|---|",
            *claims,
            *(
                ["", "What report.md measured where a claim does not hold:", "", *causes]
                if causes
                else []
            ),
        ]
    )


def lambda_sweep() -> str:
    """The section of `make lambda-sweep`."""
    with tempfile.TemporaryDirectory() as tmp:
        minutes, peak = timed_make("lambda-sweep", Path(tmp))
        table = (Path(tmp) / "lambda" / "lambda.md").read_text()
    return "\n".join(
        [
            "## make lambda-sweep (bench/embedded_studies.py)",
            "",
            f"`make lambda-sweep` on {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores: "
            f"{minutes:.1f} min, peak RSS {peak:.2f} GiB. The embedded PIRL at each lambda "
            "(0: NPID++'s loss; 1: the patch term alone), on the held-out split:",
            "",
            table,
        ]
    )


if __name__ == "__main__":
    print(paper_small() + "\n\n" + lambda_sweep())
